//! Resource overrides: requests and limits over an instance type's, with every value checked as a
//! Kubernetes quantity at apply time (k8s-openapi's ResourceRequirements schema accepts any
//! string, and a bad one would only fail when the operator writes the pod).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::validation::QUANTITY;

/// Requests and limits that override an instance type's, resource by resource.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceOverrides {
    /// Requests by resource name (`cpu`, `memory`, …), each a Kubernetes quantity such as `500m`
    /// or `8Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_map")]
    pub requests: Option<BTreeMap<String, Quantity>>,
    /// Limits by resource name, each a Kubernetes quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_map")]
    pub limits: Option<BTreeMap<String, Quantity>>,
}

/// A map of resource names to quantities, as Kubernetes' own resource lists validate them.
fn quantity_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 16,
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
            "x-kubernetes-int-or-string": true
        }
    })
}
