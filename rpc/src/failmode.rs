//! Fail modes: what an [`XClient`](crate::XClient) does when an attempt fails. A small policy
//! run over two closures — pick an endpoint, make one attempt on it — so it is tested here with
//! scripted fake endpoints, and end to end in `tests/`.

use std::{future::Future, time::Duration};

use crate::{Error, Result};

/// What an [`XClient`](crate::XClient) does when a call fails at the transport level
/// (connection lost, deadline, refused, handshake failure: [`Error::is_transport`]). A handler's
/// own error ([`Error::Remote`] and the other statuses) is returned at once in every mode, never
/// retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailMode {
    /// One attempt; the first error is returned.
    #[default]
    Failfast,
    /// Retry the same endpoint, up to [`ClientOption::retries`](crate::ClientOption::retries)
    /// more times.
    Failtry,
    /// Try another endpoint each time, up to
    /// [`ClientOption::retries`](crate::ClientOption::retries) more times (every endpoint once
    /// before any is tried again).
    Failover,
    /// If no reply came within
    /// [`ClientOption::backup_latency`](crate::ClientOption::backup_latency), send the call to a
    /// second endpoint as well; the first successful reply wins and the other attempt is
    /// cancelled. A transport failure of the first before then sends it to the second at once;
    /// a handler's error is the answer.
    Failbackup,
}

/// A fail mode with its numbers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) mode: FailMode,
    /// Extra attempts for `Failtry` and `Failover`.
    pub(crate) retries: u32,
    /// Pause between attempts.
    pub(crate) retry_interval: Duration,
    /// `Failbackup`: when to start the second attempt.
    pub(crate) backup_latency: Duration,
}

impl Policy {
    /// Runs one call under the policy. `pick(tried)` chooses an endpoint, avoiding `tried` where
    /// it can (it fails when there is none at all); `attempt(endpoint)` makes one attempt. Returns
    /// the first success, or the error that made the policy give up.
    ///
    /// Dropping the returned future cancels the attempts in flight.
    pub(crate) async fn run<T, R, P, A, F>(&self, pick: P, attempt: A) -> Result<R>
    where
        T: Clone,
        P: Fn(&[T]) -> Result<T>,
        A: Fn(T) -> F,
        F: Future<Output = Result<R>>,
    {
        match self.mode {
            FailMode::Failfast => attempt(pick(&[])?).await,
            FailMode::Failtry => {
                let target = pick(&[])?;
                let mut retries_left = self.retries;
                loop {
                    match attempt(target.clone()).await {
                        Err(e) if e.is_transport() && retries_left > 0 => {
                            tracing::debug!(retries_left, "retrying: {e}");
                            retries_left -= 1;
                            tokio::time::sleep(self.retry_interval).await;
                        }
                        other => return other,
                    }
                }
            }
            FailMode::Failover => {
                let mut tried: Vec<T> = Vec::new();
                let mut retries_left = self.retries;
                loop {
                    let target = match pick(&tried) {
                        Ok(target) => target,
                        Err(_) if !tried.is_empty() => {
                            // Every endpoint failed once: start over.
                            tried.clear();
                            pick(&tried)?
                        }
                        Err(e) => return Err(e),
                    };
                    match attempt(target.clone()).await {
                        Err(e) if e.is_transport() && retries_left > 0 => {
                            tracing::debug!(retries_left, "failing over: {e}");
                            retries_left -= 1;
                            tried.push(target);
                            tokio::time::sleep(self.retry_interval).await;
                        }
                        other => return other,
                    }
                }
            }
            FailMode::Failbackup => {
                let first = pick(&[])?;
                let primary = attempt(first.clone());
                tokio::pin!(primary);
                tokio::select! {
                    result = &mut primary => match result {
                        // A transport failure before the backup was due: the backup goes at
                        // once, as it would have for a slow answer.
                        Err(e) if e.is_transport() => {
                            return match pick(std::slice::from_ref(&first)) {
                                Ok(second) => attempt(second).await,
                                Err(_) => Err(e),
                            };
                        }
                        other => return other,
                    },
                    () = tokio::time::sleep(self.backup_latency) => {}
                }
                let Ok(second) = pick(std::slice::from_ref(&first)) else {
                    return primary.await;
                };
                let backup = attempt(second);
                tokio::pin!(backup);
                // The first answer wins unless it is a transport failure: a handler's error is
                // the call's answer at once, as in every mode.
                let settled = |r: &Result<R>| r.as_ref().err().is_none_or(|e| !e.is_transport());
                tokio::select! {
                    result = &mut primary => if settled(&result) { result } else { backup.await },
                    result = &mut backup => if settled(&result) { result } else { primary.await },
                }
            }
        }
    }
}

/// The error a picker returns when no endpoint is left to pick.
pub(crate) fn no_endpoint(service_path: &str) -> Error {
    Error::NoEndpoints(service_path.to_owned())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// What one fake endpoint answers, attempt after attempt: a delay (ms), then a result.
    type Script = VecDeque<(u64, Result<u32>)>;

    /// Fake endpoints: each answers from its script (a delay, then a result), and every attempt
    /// is logged.
    #[derive(Clone, Default)]
    struct Fake {
        scripts: Arc<Mutex<Vec<Script>>>,
        log: Arc<Mutex<Vec<usize>>>,
    }

    fn lost() -> Error {
        Error::ConnectionLost(quinn::ConnectionError::TimedOut)
    }

    impl Fake {
        fn new(scripts: Vec<Vec<(u64, Result<u32>)>>) -> Self {
            Self {
                scripts: Arc::new(Mutex::new(
                    scripts.into_iter().map(VecDeque::from).collect(),
                )),
                log: Arc::default(),
            }
        }

        /// Picks the lowest endpoint not tried.
        fn pick(&self, tried: &[usize]) -> Result<usize> {
            let n = self.scripts.lock().unwrap().len();
            (0..n)
                .find(|i| !tried.contains(i))
                .ok_or_else(|| no_endpoint("Fake"))
        }

        async fn attempt(&self, i: usize) -> Result<u32> {
            self.log.lock().unwrap().push(i);
            let step = self.scripts.lock().unwrap()[i].pop_front();
            let (delay, result) = step.unwrap_or((0, Ok(i as u32)));
            tokio::time::sleep(Duration::from_millis(delay)).await;
            result
        }

        fn log(&self) -> Vec<usize> {
            self.log.lock().unwrap().clone()
        }
    }

    fn policy(mode: FailMode) -> Policy {
        Policy {
            mode,
            retries: 2,
            retry_interval: Duration::from_millis(1),
            backup_latency: Duration::from_millis(10),
        }
    }

    async fn run(mode: FailMode, fake: &Fake) -> Result<u32> {
        policy(mode)
            .run(|t| fake.pick(t), |i| fake.attempt(i))
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn failfast_makes_one_attempt() {
        let fake = Fake::new(vec![vec![(0, Err(lost()))], vec![]]);
        assert!(run(FailMode::Failfast, &fake).await.is_err());
        assert_eq!(fake.log(), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn failtry_retries_the_same_endpoint_up_to_the_limit() {
        let fake = Fake::new(vec![
            vec![(0, Err(lost())), (0, Err(lost())), (0, Ok(7))],
            vec![],
        ]);
        assert_eq!(run(FailMode::Failtry, &fake).await.unwrap(), 7);
        assert_eq!(fake.log(), [0, 0, 0]);

        let fake = Fake::new(vec![(0..5).map(|_| (0, Err(lost()))).collect(), vec![]]);
        assert!(run(FailMode::Failtry, &fake).await.is_err());
        assert_eq!(fake.log(), [0, 0, 0], "1 attempt + 2 retries");
    }

    #[tokio::test(start_paused = true)]
    async fn failover_moves_on_and_starts_over_when_all_failed() {
        let fake = Fake::new(vec![vec![(0, Err(lost()))], vec![(0, Ok(1))]]);
        assert_eq!(run(FailMode::Failover, &fake).await.unwrap(), 1);
        assert_eq!(fake.log(), [0, 1]);

        let fake = Fake::new(vec![
            vec![(0, Err(lost())), (0, Ok(10))],
            vec![(0, Err(lost()))],
        ]);
        assert_eq!(run(FailMode::Failover, &fake).await.unwrap(), 10);
        assert_eq!(fake.log(), [0, 1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn handler_errors_are_never_retried() {
        for mode in [FailMode::Failtry, FailMode::Failover] {
            let remote = Error::Remote {
                code: 4000,
                message: "no".into(),
            };
            let fake = Fake::new(vec![vec![(0, Err(remote))], vec![]]);
            assert!(matches!(
                run(mode, &fake).await,
                Err(Error::Remote { code: 4000, .. })
            ));
            assert_eq!(fake.log(), [0], "{mode:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failbackup_races_a_second_endpoint_when_the_first_is_slow() {
        // The first answers after 1 s; the backup (started at 10 ms) answers at once and wins.
        let fake = Fake::new(vec![vec![(1000, Ok(0))], vec![(0, Ok(1))]]);
        let started = tokio::time::Instant::now();
        assert_eq!(run(FailMode::Failbackup, &fake).await.unwrap(), 1);
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(fake.log(), [0, 1]);

        // A fast first answer never starts the backup.
        let fake = Fake::new(vec![vec![(1, Ok(0))], vec![(0, Ok(1))]]);
        assert_eq!(run(FailMode::Failbackup, &fake).await.unwrap(), 0);
        assert_eq!(fake.log(), [0]);

        // A failed backup leaves the answer to the first.
        let fake = Fake::new(vec![vec![(50, Ok(0))], vec![(0, Err(lost()))]]);
        assert_eq!(run(FailMode::Failbackup, &fake).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failbackup_sends_to_the_backup_at_once_when_the_first_fails_fast() {
        let fake = Fake::new(vec![vec![(1, Err(lost()))], vec![(0, Ok(1))]]);
        let started = tokio::time::Instant::now();
        assert_eq!(run(FailMode::Failbackup, &fake).await.unwrap(), 1);
        assert_eq!(fake.log(), [0, 1]);
        // At the first's failure (1 ms), not after the backup latency.
        assert!(
            started.elapsed() < Duration::from_millis(5),
            "{:?}",
            started.elapsed()
        );
        // With no second endpoint, the failure is the answer.
        let fake = Fake::new(vec![vec![(1, Err(lost()))]]);
        assert!(run(FailMode::Failbackup, &fake).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn failbackup_returns_a_handler_error_at_once() {
        // The backup is stalled; the first answers with a handler's error at 50 ms.
        let remote = Error::Remote {
            code: 4000,
            message: "no".into(),
        };
        let fake = Fake::new(vec![vec![(50, Err(remote))], vec![(10_000, Ok(1))]]);
        let started = tokio::time::Instant::now();
        assert!(matches!(
            run(FailMode::Failbackup, &fake).await,
            Err(Error::Remote { code: 4000, .. })
        ));
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn no_endpoint_at_all_fails_at_once() {
        let fake = Fake::new(vec![]);
        for mode in [
            FailMode::Failfast,
            FailMode::Failtry,
            FailMode::Failover,
            FailMode::Failbackup,
        ] {
            assert!(matches!(run(mode, &fake).await, Err(Error::NoEndpoints(_))));
        }
        assert!(fake.log().is_empty());
    }
}
