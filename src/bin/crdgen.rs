//! Prints every CRD as YAML, or with `--out DIR` writes one file per CRD (what `make generate` runs).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use promptflow_operator::crd;

/// Generate the promptflow.dev CustomResourceDefinitions from the Rust types.
#[derive(Parser)]
struct Args {
    /// Write `<crd name>.yaml` files into this directory instead of printing a YAML stream.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    for (file, definition) in crd::all() {
        let yaml = crd::to_yaml(&definition)?;
        match &args.out {
            Some(dir) => std::fs::write(dir.join(file), yaml)?,
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
