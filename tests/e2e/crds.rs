//! The API contract on the real API server: CRDs install, samples are accepted, the invalid
//! corpus is rejected with messages that name the field, printer columns and categories work.

use std::path::PathBuf;
use std::time::Duration;

use promptflow_operator::api::PromptFlowRuntime;

use crate::harness::{self, kubectl, with_namespace};

#[tokio::test]
async fn crds_become_established_and_explain_shows_field_docs() {
    let client = harness::client().await;
    harness::install_crds(&client).await;
    // The API server publishes a new CRD's OpenAPI a moment after it is Established.
    let (ok, text) = harness::kubectl_eventually(Duration::from_secs(30), &["explain", "promptflowruntime.spec"]).await;
    assert!(ok, "kubectl explain failed: {text}");
    assert!(
        text.contains("exactly one of `serverless` or"),
        "field docs missing:\n{text}"
    );
    let (ok, text) = harness::kubectl_eventually(
        Duration::from_secs(30),
        &["explain", "computeinstance.spec.schedules.cron"],
    )
    .await;
    assert!(
        ok && text.contains("five-field cron expression"),
        "field docs missing:\n{text}"
    );
}

#[tokio::test]
async fn every_sample_is_accepted() {
    with_namespace("pf-samples", |ns| async move {
        let mut count = 0;
        for path in yaml_files("config/samples") {
            for object in harness::read_manifests(&path) {
                harness::apply(&ns.client, &ns.name, &object, true)
                    .await
                    .unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
                count += 1;
            }
            let file = path.to_string_lossy().into_owned();
            let (ok, text) = harness::kubectl_eventually(
                Duration::from_secs(30),
                &["apply", "--dry-run=client", "-n", &ns.name, "-f", &file],
            )
            .await;
            assert!(ok, "kubectl --dry-run=client rejected {file}: {text}");
        }
        assert!(
            count >= 3,
            "expected the samples to hold at least three objects, found {count}"
        );
    })
    .await;
}

/// Each file's first line is `# expect: <fragment>`; an optional second line
/// `# expect-server-side-apply: <fragment>` overrides it for server-side apply, whose decoder words
/// some errors differently. Each manifest goes through both paths a user's tools take: create with
/// strict field validation (`kubectl apply`, Argo CD) and server-side apply (`--server-side`, Flux).
#[tokio::test]
async fn every_invalid_manifest_is_rejected_with_its_message() {
    with_namespace("pf-invalid", |ns| async move {
        let mut failures = Vec::new();
        let files = yaml_files("tests/e2e/invalid");
        for path in &files {
            let text = std::fs::read_to_string(path).unwrap();
            let expected =
                header(&text, "# expect: ").unwrap_or_else(|| panic!("{} lacks an `# expect:` line", path.display()));
            let expected_ssa = header(&text, "# expect-server-side-apply: ").unwrap_or(expected);

            let file = path.to_string_lossy().into_owned();
            let (ok, output) = kubectl(&[
                "create",
                "--dry-run=server",
                "--validate=strict",
                "-n",
                &ns.name,
                "-f",
                &file,
            ])
            .await;
            if ok || !output.contains(expected) {
                failures.push(format!(
                    "{file} (create): expected rejection with {expected:?}, got: {output}"
                ));
            }
            for object in harness::read_manifests(path) {
                match harness::apply(&ns.client, &ns.name, &object, true).await {
                    Err(err) if err.to_string().contains(expected_ssa) => {}
                    other => failures.push(format!(
                        "{file} (server-side apply): expected rejection with {expected_ssa:?}, got: {other:?}"
                    )),
                }
            }
        }
        println!(
            "invalid corpus: {} manifests, {} rejected as expected on both paths",
            files.len(),
            files.len() - failures.len()
        );
        assert!(
            files.len() >= 30,
            "the invalid corpus must hold at least 30 cases, has {}",
            files.len()
        );
        assert!(
            failures.is_empty(),
            "{} cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    })
    .await;
}

fn header<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .take_while(|line| line.starts_with('#'))
        .find_map(|line| line.strip_prefix(prefix))
}

#[tokio::test]
async fn kubectl_get_prints_columns_and_the_category_lists_both_kinds() {
    with_namespace("pf-columns", |ns| async move {
        for path in [
            "config/samples/runtime-minimal.yaml",
            "config/samples/compute-instance.yaml",
        ] {
            for object in harness::read_manifests(&harness::repo_root().join(path)) {
                harness::apply(&ns.client, &ns.name, &object, false)
                    .await
                    .expect("apply sample");
            }
        }
        let (ok, text) = harness::kubectl_eventually(Duration::from_secs(30), &["get", "pfrt", "-n", &ns.name]).await;
        assert!(ok, "{text}");
        let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "COMPUTE", "STATUS", "VERSION", "LATEST", "AGE"],
            "{text}"
        );
        assert!(text.contains("chat"), "{text}");

        let (ok, text) = harness::kubectl_eventually(Duration::from_secs(30), &["get", "pfci", "-n", &ns.name]).await;
        assert!(ok, "{text}");
        let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "INSTANCE", "TYPE", "STATE", "RUNTIMES", "AGE"],
            "{text}"
        );
        assert!(text.contains("Standard_DS3_v2"), "{text}");

        let (ok, text) =
            harness::kubectl_eventually(Duration::from_secs(30), &["get", "promptflow", "-n", &ns.name]).await;
        assert!(ok, "{text}");
        assert!(text.contains("promptflowruntime.promptflow.dev/chat"), "{text}");
        assert!(text.contains("computeinstance.promptflow.dev/alice-ci"), "{text}");

        // Defaults from the schema are visible to the user right after apply.
        let runtime = ns.api::<PromptFlowRuntime>().get("chat").await.unwrap();
        assert_eq!(
            runtime.spec.image.repository,
            promptflow_operator::api::DEFAULT_RUNTIME_REPOSITORY
        );
    })
    .await;
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(harness::repo_root().join(dir))
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}
