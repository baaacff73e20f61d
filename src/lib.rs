//! promptflow-operator: prompt flow runtimes on any Kubernetes cluster.
#![forbid(unsafe_code)]

pub mod api;
pub mod crd;
pub mod error;
pub mod preflight;
pub mod telemetry;
