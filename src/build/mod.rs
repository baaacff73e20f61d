//! Pure builders of the Kubernetes objects the operator owns. Builders never call the API.

pub mod instance;
pub mod parts;
pub mod pod;
pub mod proxy;
pub mod service;
