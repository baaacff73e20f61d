//! The instance-type catalog: named sizes (cpu, memory, optional node selector) that runtimes are
//! made from. Operator configuration, never hard-coded in reconcile.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube_quantity::ParsedQuantity;
use serde::Deserialize;

/// The catalog built into the binary (the same file the chart ships).
const BUILTIN: &str = include_str!("../config/catalog/instance-types.yaml");

/// One size in the catalog.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceType {
    /// The name users write in `instanceType` (e.g. `Standard_E4ds_v4`).
    pub name: String,
    /// CPU the size provides, as a Kubernetes quantity.
    pub cpu: Quantity,
    /// Memory the size provides, as a Kubernetes quantity.
    pub memory: Quantity,
    /// Disk a pod of this size may write (container layers, logs, installed requirements), as a
    /// Kubernetes quantity: its `ephemeral-storage` request and limit. Absent: neither.
    #[serde(default)]
    pub ephemeral_storage: Option<Quantity>,
    /// Node labels a pod of this size must land on.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
}

impl InstanceType {
    /// Requests and limits of a pod of this size.
    pub fn resources(&self) -> ResourceRequirements {
        let mut list = BTreeMap::from([
            ("cpu".to_owned(), self.cpu.clone()),
            ("memory".to_owned(), self.memory.clone()),
        ]);
        if let Some(disk) = &self.ephemeral_storage {
            list.insert("ephemeral-storage".to_owned(), disk.clone());
        }
        ResourceRequirements {
            requests: Some(list.clone()),
            limits: Some(list),
            ..Default::default()
        }
    }
}

/// The ordered list of sizes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Catalog {
    /// The sizes, smallest first: the default choice is the first that fits the quota.
    pub instance_types: Vec<InstanceType>,
}

/// Why a catalog file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("cannot read the instance-type catalog {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse into a catalog.
    #[error("the instance-type catalog does not parse: {0}")]
    Parse(#[from] serde_norway::Error),
    /// The content is not a usable catalog.
    #[error("the instance-type catalog is invalid: {0}")]
    Invalid(String),
}

impl Catalog {
    /// The built-in catalog.
    pub fn builtin() -> Self {
        Self::from_yaml(BUILTIN).expect("the built-in catalog is valid")
    }

    /// Reads a catalog file, or the built-in one when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, CatalogError> {
        match path {
            None => Ok(Self::builtin()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::from_yaml(&text)
            }
        }
    }

    /// Parses and checks a catalog: at least one size, unique names, parsable positive quantities.
    pub fn from_yaml(text: &str) -> Result<Self, CatalogError> {
        let catalog: Catalog = serde_norway::from_str(text)?;
        if catalog.instance_types.is_empty() {
            return Err(CatalogError::Invalid("it lists no instance types".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for size in &catalog.instance_types {
            if !seen.insert(size.name.as_str()) {
                return Err(CatalogError::Invalid(format!(
                    "instance type {} is listed twice",
                    size.name
                )));
            }
            for (what, quantity) in [("cpu", &size.cpu), ("memory", &size.memory)] {
                let parsed = ParsedQuantity::try_from(quantity)
                    .map_err(|e| CatalogError::Invalid(format!("{} {what} {:?}: {e}", size.name, quantity.0)))?;
                if parsed <= ParsedQuantity::default() {
                    return Err(CatalogError::Invalid(format!("{} {what} must be positive", size.name)));
                }
            }
        }
        Ok(catalog)
    }

    /// The size with this name.
    pub fn get(&self, name: &str) -> Option<&InstanceType> {
        self.instance_types.iter().find(|size| size.name == name)
    }

    /// The names, in catalog order, for messages.
    pub fn names(&self) -> String {
        self.instance_types
            .iter()
            .map(|size| size.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_lists_the_azure_like_sizes_smallest_first() {
        let catalog = Catalog::builtin();
        assert_eq!(catalog.instance_types[0].name, "Standard_D2s_v3");
        let e4 = catalog.get("Standard_E4ds_v4").unwrap();
        assert_eq!(e4.memory.0, "32Gi");
        let resources = e4.resources();
        assert_eq!(resources.requests, resources.limits);
        assert!(catalog.names().contains("Standard_DS3_v2"));
        assert!(catalog.get("Standard_NC6").is_none());
    }

    #[test]
    fn invalid_catalogs_are_refused_with_a_reason() {
        for (yaml, fragment) in [
            ("instanceTypes: []", "no instance types"),
            (
                "instanceTypes: [{name: a, cpu: '1', memory: 1Gi}, {name: a, cpu: '2', memory: 2Gi}]",
                "twice",
            ),
            ("instanceTypes: [{name: a, cpu: lots, memory: 1Gi}]", "a cpu"),
            ("instanceTypes: [{name: a, cpu: '0', memory: 1Gi}]", "positive"),
            (
                "instanceTypes: [{name: a, cpu: '1', memory: 1Gi, gpu: 1}]",
                "unknown field",
            ),
        ] {
            let err = Catalog::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(fragment), "{yaml}: {err}");
        }
    }

    #[test]
    fn node_selectors_are_read() {
        let catalog = Catalog::from_yaml(
            "instanceTypes: [{name: gpu, cpu: '8', memory: 64Gi, nodeSelector: {node.kubernetes.io/instance-type: gpu}}]",
        )
        .unwrap();
        assert_eq!(
            catalog.instance_types[0].node_selector["node.kubernetes.io/instance-type"],
            "gpu"
        );
    }
}
