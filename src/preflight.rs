//! Start-up checks: the operator refuses to run against a cluster without its CRDs.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use tracing::info;

use crate::api::{self, ComputeInstance, PromptFlowRuntime};
use crate::error::{Error, Result};

/// Checks that both CRDs are installed, Established, and serve `v1alpha1`.
pub async fn check_crds(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for wanted in [PromptFlowRuntime::crd_name(), ComputeInstance::crd_name()] {
        let crd = crds.get_opt(wanted).await?.ok_or_else(|| Error::CrdNotReady {
            name: wanted.to_owned(),
            problem: "is not installed".to_owned(),
        })?;
        crd_problem(&crd).map_or(Ok(()), |problem| {
            Err(Error::CrdNotReady {
                name: wanted.to_owned(),
                problem,
            })
        })?;
        info!(crd = %crd.name_any(), version = api::VERSION, "CRD installed and Established");
    }
    Ok(())
}

/// Why an installed CRD cannot be used yet, if it cannot.
fn crd_problem(crd: &CustomResourceDefinition) -> Option<String> {
    let established = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Established" && c.status == "True");
    if !established {
        return Some("is not Established yet".to_owned());
    }
    let served = crd.spec.versions.iter().any(|v| v.name == api::VERSION && v.served);
    (!served).then(|| {
        format!(
            "does not serve version {}; apply the CRDs of this release",
            api::VERSION
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinitionCondition, CustomResourceDefinitionStatus,
    };

    fn with_established(status: &str) -> CustomResourceDefinition {
        let mut crd = PromptFlowRuntime::crd();
        crd.status = Some(CustomResourceDefinitionStatus {
            conditions: Some(vec![CustomResourceDefinitionCondition {
                type_: "Established".into(),
                status: status.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        crd
    }

    #[test]
    fn established_crd_of_this_version_is_usable() {
        assert_eq!(crd_problem(&with_established("True")), None);
    }

    #[test]
    fn not_established_crd_is_reported() {
        assert_eq!(
            crd_problem(&with_established("False")).as_deref(),
            Some("is not Established yet")
        );
        assert!(crd_problem(&PromptFlowRuntime::crd()).is_some());
    }

    #[test]
    fn crd_without_served_version_is_reported() {
        let mut crd = with_established("True");
        crd.spec.versions[0].served = false;
        assert!(crd_problem(&crd).unwrap().contains("v1alpha1"));
    }
}
