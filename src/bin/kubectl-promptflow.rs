//! `kubectl-promptflow`: the kubectl plugin (`kubectl promptflow …`) for prompt flow runtimes and
//! compute instances. Everything lives in the library's `cli` module.
#![forbid(unsafe_code)]

use clap::Parser;
use promptflow_operator::cli::{self, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // rustls needs one process-wide crypto provider; the operator installs the same.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli::run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
