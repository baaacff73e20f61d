//! promptflow-operator: prompt flow runtimes on any Kubernetes cluster.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod build;
pub mod catalog;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod error;
#[cfg(test)]
pub mod fixtures;
pub mod flow;
pub mod identity;
pub mod idle;
pub mod image_ref;
pub mod instance;
pub mod leader;
pub mod metrics;
pub mod preflight;
pub mod proxy;
pub mod quota;
pub mod registry;
pub mod telemetry;
