//! The `promptflow-operator` process: connects, checks its CRDs, and runs the controllers.
#![forbid(unsafe_code)]

use clap::Parser;
use promptflow_operator::{error::Error, preflight, telemetry};
use tracing::{error, info};

/// Kubernetes operator for prompt flow runtimes. The cluster comes from the standard kubeconfig
/// resolution: $KUBECONFIG, ~/.kube/config, or the in-cluster service account.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Log format.
    #[arg(long, env = "PF_LOG_FORMAT", value_enum, default_value_t)]
    log_format: telemetry::LogFormat,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %err, kind = err.metric_label(), "promptflow-operator cannot run");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let client = kube::Client::try_default().await.map_err(Error::Connect)?;
    let version = client.apiserver_version().await.map_err(Error::Connect)?;
    info!(server = %version.git_version, "connected to the Kubernetes API");
    preflight::check_crds(&client).await?;
    info!("both CRDs are installed and Established");
    Ok(())
}
