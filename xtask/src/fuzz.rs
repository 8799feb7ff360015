//! `cargo xtask fuzz`: a mutation fuzzer for every decoder of the wire protocol, on the stable
//! toolchain. It starts from the documented example frames, mutates them (byte changes, bit
//! flips, truncation, insertion, length fields) and feeds each input to `quicx::fuzz::fuzz_decoders`,
//! which must never panic. A panic prints the input and fails the run.

use std::time::{Duration, Instant};

pub(crate) fn run(seconds: u64, seed: u64) -> anyhow::Result<()> {
    let seeds = quicx::fuzz::fuzz_seeds();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut state = seed.max(1);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut runs = 0u64;
    // Quiet default hook: we report the failing input ourselves.
    std::panic::set_hook(Box::new(|_| {}));
    while Instant::now() < deadline {
        for _ in 0..1000 {
            let mut input = if next() % 8 == 0 {
                (0..next() % 64).map(|_| next() as u8).collect()
            } else {
                seeds[(next() as usize) % seeds.len()].clone()
            };
            for _ in 0..=(next() % 6) {
                let at = (next() as usize) % (input.len() + 1);
                match next() % 5 {
                    0 if at < input.len() => input[at] = next() as u8,
                    1 => input.truncate(at),
                    2 => input.insert(at, next() as u8),
                    3 if input.len() >= 5 => {
                        // Rewrite the header length.
                        let len = (next() % 300) as u32;
                        input[1..5].copy_from_slice(&len.to_be_bytes());
                    }
                    _ if at < input.len() => input[at] ^= 1 << (next() % 8),
                    _ => {}
                }
            }
            let outcome = std::panic::catch_unwind(|| quicx::fuzz::fuzz_decoders(&input));
            runs += 1;
            if outcome.is_err() {
                let _ = std::panic::take_hook();
                anyhow::bail!("a decoder panicked on input {input:02x?} (run {runs}, seed {seed})");
            }
        }
    }
    let _ = std::panic::take_hook();
    println!(
        "fuzz: {runs} inputs in {seconds} s ({:.0}/s), seed {seed}: no decoder panicked",
        runs as f64 / seconds.max(1) as f64
    );
    Ok(())
}
