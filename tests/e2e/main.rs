//! End-to-end tests against the real local cluster (`make cluster-up`): the API server, its
//! admission and validation, the controllers, kwok nodes, and the operator binary as a process.
//! Run with `make e2e`; each test works in a namespace of its own.

mod harness;
mod helm;

mod big_metadata;
mod budget;
mod chart;
mod cluster;
mod crds;
mod events;
mod faults;
mod first_status;
mod gitops;
mod hardening;
mod idle;
mod idle_trust;
mod image;
mod instance;
mod instance_safety;
mod leader;
mod operator;
mod plugin;
mod processes;
mod proxy;
mod registry;
mod runtime;
mod tenancy;
mod versions;
