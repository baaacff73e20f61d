//! `kubectl promptflow`: the portal's buttons (Start, Stop, Restart, Check version, Update) and a
//! readable status for the command line. Each action makes the documented annotation change,
//! waits for the operator to handle it, prints what happened and fails (exit 1) when it did not.
//! The binary is `kubectl-promptflow`, so kubectl finds it on `PATH` as a plugin.

mod action;
mod describe;
mod progress;
mod status;
mod table;
mod target;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Serialize;

pub use action::{Action, Step, judge_instance, judge_runtime};
pub use target::{Kind, Target};

/// Prompt flow runtimes and compute instances from the command line: `kubectl promptflow`.
#[derive(Parser, Debug)]
#[command(name = "kubectl promptflow", bin_name = "kubectl promptflow", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// The namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Every namespace (`status` only).
    #[arg(short = 'A', long = "all-namespaces", global = true)]
    pub all_namespaces: bool,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Print objects as JSON or YAML instead of the readable form.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Output>,
    /// How long an action waits for its result (Go duration).
    #[arg(long, global = true, default_value = "5m", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Make the change and return without waiting for its result.
    #[arg(long, global = true)]
    pub no_wait: bool,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runtimes and compute instances: phase, reason, version, latest version, idle deadline.
    Status,
    /// Start a stopped runtime or compute instance, and wait until it runs.
    Start {
        /// `NAME` (a runtime), `pfrt/NAME` or `pfci/NAME`.
        target: Target,
    },
    /// Stop a runtime (its pod goes, the object stays) or a compute instance.
    Stop {
        /// `NAME` (a runtime), `pfrt/NAME` or `pfci/NAME`.
        target: Target,
    },
    /// Replace a runtime's pod once, and wait until it runs again.
    Restart {
        /// `NAME` or `pfrt/NAME`.
        target: Target,
    },
    /// Ask the registry now whether a newer runtime version exists.
    CheckVersion {
        /// `NAME` or `pfrt/NAME`.
        target: Target,
    },
    /// Move a runtime to the newest version, and wait until it runs on it.
    Update {
        /// `NAME` or `pfrt/NAME`.
        target: Target,
    },
    /// Status, conditions and recent events of one runtime or compute instance.
    Describe {
        /// `NAME` (a runtime), `pfrt/NAME` or `pfci/NAME`.
        target: Target,
    },
}

/// Machine-readable output.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// What went wrong, for the user; the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The cluster could not be reached or refused a request.
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// The kubeconfig could not be used.
    #[error("kubeconfig: {0}")]
    Config(String),
    /// The action did not reach its result.
    #[error("{0}")]
    Failed(String),
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    crate::idle::parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration such as 30s, 5m or 1h"))
}

/// A client and the namespace to use, from the kubeconfig flags.
async fn connect(cli: &Cli) -> Result<(Client, String), CliError> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| CliError::Config(e.to_string()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options).await,
        None => {
            return Config::infer()
                .await
                .map_err(|e| CliError::Config(e.to_string()))
                .and_then(|config| with_namespace(cli, config));
        }
    }
    .map_err(|e| CliError::Config(e.to_string()))?;
    with_namespace(cli, config)
}

fn with_namespace(cli: &Cli, config: Config) -> Result<(Client, String), CliError> {
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    Ok((client, namespace))
}

/// Prints `value` as the `-o` format asked for.
fn print_as<T: Serialize>(output: Output, value: &T) -> Result<(), CliError> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value).map_err(|e| CliError::Failed(e.to_string()))? + "\n",
        Output::Yaml => serde_norway::to_string(value).map_err(|e| CliError::Failed(e.to_string()))?,
    };
    print!("{text}");
    Ok(())
}

/// Runs the command line; the exit code is 0 on success and 1 on failure.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    if cli.all_namespaces && !matches!(cli.command, Command::Status) {
        return Err(CliError::Failed(
            "-A/--all-namespaces lists (status); an action or describe needs -n NAMESPACE".into(),
        ));
    }
    let (client, namespace) = connect(&cli).await?;
    match &cli.command {
        Command::Status => status::run(&client, &cli, &namespace).await,
        Command::Describe { target } => describe::run(&client, &cli, &namespace, target).await,
        Command::Start { target } => action::run(&client, &cli, &namespace, target, Action::Start).await,
        Command::Stop { target } => action::run(&client, &cli, &namespace, target, Action::Stop).await,
        Command::Restart { target } => action::run(&client, &cli, &namespace, target, Action::Restart).await,
        Command::CheckVersion { target } => action::run(&client, &cli, &namespace, target, Action::CheckVersion).await,
        Command::Update { target } => action::run(&client, &cli, &namespace, target, Action::Update).await,
    }
}
