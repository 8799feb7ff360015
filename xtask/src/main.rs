//! Project tasks, in plain Rust: `cargo xtask demo [--cluster] | ci | fuzz | bench`.
#![forbid(unsafe_code)]

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

mod cluster_demo;
mod cluster_node;
mod demo;
mod etcd;
mod fuzz;

#[derive(Parser)]
#[command(about = "quicx project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// A server and three devices on loopback: call, push by id, broadcast, reverse call,
    /// reconnect, durable commands to an offline device that arrive after a server restart;
    /// with --cluster, three nodes on etcd. Exits non-zero if any step fails.
    Demo {
        /// Instead: etcd and three nodes on loopback, devices spread over them, a push and a
        /// reverse call that cross nodes, a node killed with SIGKILL and its devices reconnecting
        /// to the others (needs etcd: `apt-get install etcd-server`).
        #[arg(long)]
        cluster: bool,
    },
    /// What CI runs: fmt check, clippy -D warnings, build everything (benches included), tests.
    Ci,
    /// Mutation-fuzz every wire-protocol decoder (stable toolchain).
    Fuzz {
        /// How long to run.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Random seed (a failure prints it).
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
    },
    /// Benchmarks side by side (release build): quicx, raw quinn, tonic, tarpc. Writes
    /// target/bench/report.md, results.json and SVG plots.
    Bench {
        /// A short run, under 2 minutes.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for the harness (`--system quicx --layout one-process`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// One node of `demo --cluster` (the demo runs it as a child process).
    #[command(hide = true)]
    ClusterNode(cluster_node::NodeArgs),
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()?;
    anyhow::ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

fn ci() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["build", "--workspace", "--all-targets", "--locked"])?;
    cargo(&["test", "--workspace", "--locked"])?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Demo { cluster: false } => demo::run(),
        Task::Demo { cluster: true } => cluster_demo::run(),
        Task::ClusterNode(args) => cluster_node::run(args),
        Task::Ci => ci(),
        Task::Fuzz { seconds, seed } => fuzz::run(seconds, seed),
        Task::Bench { quick, args } => {
            let mut cmd = vec![
                "run",
                "--release",
                "--locked",
                "-p",
                "quicx-benches",
                "--bin",
                "quicx-bench",
                "--",
            ];
            if quick {
                cmd.push("--quick");
            }
            cmd.extend(args.iter().map(String::as_str));
            cargo(&cmd)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
