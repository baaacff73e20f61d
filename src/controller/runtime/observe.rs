//! Observe: read what a runtime points to. Service accounts, pods and quotas come from the watch
//! caches; pull secrets and the flow ConfigMap are read from the API one by one, so no cache ever
//! holds secret data. What a reconcile is about to read is recorded in the dependency index
//! *before* it reads, so a change landing in between still wakes the runtime. Secrets are not
//! watched: a runtime blocked by one is looked at again with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota, Secret, ServiceAccount};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::Context;
use super::size;
use crate::api::{ComputeInstance, DEFAULT_SERVICE_ACCOUNT, PromptFlowRuntime};
use crate::build::instance as instance_pod;
use crate::build::pod;
use crate::controller::index::Dependency;
use crate::error::{Error, Result};
use crate::identity;

/// What the reconcile read about the runtime's surroundings.
pub struct Observed {
    /// The service account the runtime pulls with.
    pub account_name: String,
    /// That account, when it exists.
    pub account: Option<Arc<ServiceAccount>>,
    /// Each imagePullSecret the account names, `None` when it does not exist.
    pub secrets: BTreeMap<String, Option<Secret>>,
    /// The flow ConfigMap, when the runtime names one.
    pub flow: Option<FlowSource>,
    /// The runtime's pod, when it exists.
    pub pod: Option<Arc<Pod>>,
    /// The namespace's quotas; read only when a pod is being sized.
    pub quotas: Vec<ResourceQuota>,
    /// The compute instance `spec.compute.instance` names, and the pod the operator made for it.
    pub instance: Option<InstanceSeen>,
}

/// A compute instance a runtime asks for, as the caches hold it.
pub struct InstanceSeen {
    /// The instance, when it exists.
    pub object: Option<Arc<ComputeInstance>>,
    /// Its pod, when the operator made one for it.
    pub pod: Option<Arc<Pod>>,
}

/// The flow ConfigMap a runtime names, and what was found under that name.
pub struct FlowSource {
    /// `spec.flow.configMapName`.
    pub config_map: String,
    /// The ConfigMap, when it exists.
    pub found: Option<ConfigMap>,
}

/// Reads everything `runtime` points to; what it is about to read goes to `record` first.
/// A runtime on a compute instance has no pod of its own and is never sized.
pub async fn observe(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    namespace: &str,
    record: impl FnOnce(Vec<Dependency>),
) -> Result<Observed> {
    let account_name = runtime
        .spec
        .identity
        .as_ref()
        .and_then(|i| i.service_account_name.clone())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
    let flow_name = runtime.spec.flow.as_ref().and_then(|f| f.config_map_name.clone());
    let serverless = runtime.spec.compute.serverless.is_some();
    let pod = ctx
        .own_pod(&pod::pod_name(&runtime.name_any()), namespace, runtime)
        .filter(|_| serverless);

    let mut dependencies = vec![Dependency::ServiceAccount(namespace.to_owned(), account_name.clone())];
    if let Some(cm) = &flow_name {
        dependencies.push(Dependency::ConfigMap(namespace.to_owned(), cm.clone()));
    }
    let sizing = serverless && size::needs_sizing(runtime, pod.as_deref());
    if sizing {
        dependencies.push(Dependency::Quotas(namespace.to_owned()));
    }
    // The instance asked for, and the one the status last named (a runtime moving away waits
    // for that one to let go).
    dependencies.extend(super::on_instance::instances_watched(runtime));
    record(dependencies);

    let account = ctx.accounts.get(&ObjectRef::new(&account_name).within(namespace));
    let secret_names = account.as_deref().map(identity::pull_secret_names).unwrap_or_default();
    let mut secrets = BTreeMap::new();
    for secret in secret_names {
        let found = read_secret(&ctx.client, namespace, &secret).await?;
        secrets.insert(secret, found);
    }
    let flow = match flow_name {
        Some(config_map) => {
            let found = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
                .get_opt(&config_map)
                .await?;
            Some(FlowSource { config_map, found })
        }
        None => None,
    };
    // Quotas matter only when a pod is sized; a runtime that keeps its pod never reads them.
    let quotas = if sizing {
        ctx.quotas
            .state_filter(|q| q.namespace().as_deref() == Some(namespace))
            .iter()
            .map(|q| (**q).clone())
            .collect()
    } else {
        Vec::new()
    };
    let instance = runtime.spec.compute.instance.as_ref().map(|asked| {
        let object = ctx.instances.get(&ObjectRef::new(&asked.name).within(namespace));
        let pod = object
            .as_ref()
            .and_then(|object| ctx.own_pod(&instance_pod::pod_name(&asked.name), namespace, &**object));
        InstanceSeen { object, pod }
    });
    Ok(Observed {
        account_name,
        account,
        secrets,
        flow,
        pod,
        quotas,
        instance,
    })
}

/// Reads one Secret. Parsed here rather than by the client library, which logs the whole response
/// body at warn when it cannot parse it; this never puts the body, or a parser message quoting
/// it, anywhere. Served from the API server's watch cache (`resourceVersion=0`), not a quorum read
/// from etcd: a reconcile reads its pull secrets every time, and at thousands of runtimes those
/// reads would load etcd for no gain (a secret that changes a moment later is read again at the
/// runtime's next retry).
pub(crate) async fn read_secret(client: &kube::Client, namespace: &str, name: &str) -> Result<Option<Secret>> {
    let request = kube::core::Request::new(format!("/api/v1/namespaces/{namespace}/secrets"))
        .get(name, &kube::api::GetParams::any())
        .map_err(|e| Error::Kube(kube::Error::BuildRequest(e)))?;
    let text = match client.request_text(request).await {
        Ok(text) => text,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Unreadable {
        kind: "Secret",
        name: format!("{namespace}/{name}"),
        why: format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()),
    })
}
