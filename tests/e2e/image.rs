//! The operator image `make image` pushed to the local registry (`.cluster/image.env`), read back
//! with skopeo (not the crane that pushed it): its config says what the Dockerfile says, and its
//! entrypoint runs from the image's own files alone — the layer extracted and entered with chroot
//! as the image's user — for `--version`, `activity-proxy --help`, and `--check` against the
//! cluster over TLS.

use std::path::{Path, PathBuf};

use crate::harness;
use crate::registry::LocalRegistry;

/// `.cluster/image.env`, as `hack/image.sh` wrote it.
pub fn built_image() -> (String, String) {
    let vars = harness::cluster_env("image.env");
    (vars["OPERATOR_IMAGE"].clone(), vars["OPERATOR_IMAGE_DIGEST"].clone())
}

/// Runs skopeo `args` with the registry's credentials and CA (`copy` names them for its source).
async fn skopeo(registry: &LocalRegistry, args: &[&str]) -> String {
    let certs = harness::cluster_dir().join("registry/certs.d");
    let prefix = if args[0] == "copy" { "--src-" } else { "--" };
    let output = tokio::process::Command::new("skopeo")
        .arg(args[0])
        .args([
            format!("{prefix}creds"),
            format!("{}:{}", registry.username, registry.password),
        ])
        .args([format!("{prefix}cert-dir"), certs.display().to_string()])
        .args(&args[1..])
        .output()
        .await
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs the image's entrypoint with `args` inside `rootfs` as the image's user.
async fn in_image(rootfs: &Path, user: &str, entrypoint: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    // By absolute path: the process inside gets only `env`, not even PATH.
    let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("chroot (coreutils)");
    let output = tokio::process::Command::new(chroot)
        .arg(format!("--userspec={user}"))
        .arg(rootfs)
        .arg(entrypoint)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .await
        .expect("chroot runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn the_image_from_make_image_runs_its_entrypoint_from_its_own_files() {
    let (reference, digest) = built_image();
    let registry = LocalRegistry::read();
    let transport = format!("docker://{reference}");

    // The registry serves the digest image.sh recorded, and its config is the Dockerfile's.
    let inspected: serde_json::Value =
        serde_json::from_str(&skopeo(&registry, &["inspect", &transport]).await).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    assert_eq!(
        (inspected["Os"].as_str(), inspected["Architecture"].as_str()),
        (Some("linux"), Some(arch))
    );
    assert_eq!(inspected["Layers"].as_array().map(Vec::len), Some(1), "one layer");
    let config: serde_json::Value =
        serde_json::from_str(&skopeo(&registry, &["inspect", "--config", &transport]).await).unwrap();
    let image = &config["config"];
    assert_eq!(
        image["Entrypoint"],
        serde_json::json!(["/usr/local/bin/promptflow-operator"])
    );
    assert_eq!(image["User"], "65532:65532", "non-root");
    assert_eq!(
        image["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    // Pull it back and unpack the layer: that directory is all the entrypoint gets to see.
    let dir: PathBuf = std::env::temp_dir().join(format!("pf-image-{:08x}", rand::random::<u32>()));
    let pulled = dir.join("pulled");
    std::fs::create_dir_all(&dir).unwrap();
    skopeo(
        &registry,
        &["copy", "--quiet", &transport, &format!("dir:{}", pulled.display())],
    )
    .await;
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pulled.join("manifest.json")).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_owned();
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let untar = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(pulled.join(&layer))
        .arg("-C")
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(untar.success());

    let entrypoint = image["Entrypoint"][0].as_str().unwrap();
    let user = image["User"].as_str().unwrap();
    let (ok, version) = in_image(&rootfs, user, entrypoint, &["--version"], &[]).await;
    assert!(ok, "{version}");
    assert_eq!(
        version.trim(),
        format!("promptflow-operator {}", env!("CARGO_PKG_VERSION"))
    );
    let (ok, help) = in_image(&rootfs, user, entrypoint, &["activity-proxy", "--help"], &[]).await;
    assert!(
        ok && help.contains("activity"),
        "the sidecar ships in the same image: {help}"
    );

    // --check reaches the API server over TLS and finds the CRDs, from inside the image.
    std::fs::copy(harness::kubeconfig(), rootfs.join("tmp/kubeconfig")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(rootfs.join("tmp/kubeconfig"), mode).unwrap();
    let (ok, checked) = in_image(
        &rootfs,
        user,
        entrypoint,
        &["--check"],
        &[("KUBECONFIG", "/tmp/kubeconfig")],
    )
    .await;
    assert!(ok, "--check inside the image: {checked}");
    std::fs::remove_dir_all(&dir).ok();
}
