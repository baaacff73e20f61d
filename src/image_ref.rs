//! Image references (`[registry/]repository[:tag][@digest]`), parsed by the grammar of the
//! distribution spec's reference package, into `oci_client::Reference`.
//!
//! Why not `"…".parse::<oci_client::Reference>()`: its parser compiles one regular expression
//! whose Unicode `\w{0,127}` tag class grows to about 7 MiB of automaton, held for the life of the
//! process — more than everything the operator keeps for 1,000 runtimes (`make heap-profile`).
//! The grammar is small enough to follow by hand; the result is built with `Reference`'s own
//! constructors, so the registry client gets the same value.

use oci_client::Reference;

/// Docker Hub, for references that name no registry.
const DEFAULT_REGISTRY: &str = "docker.io";

/// Parses `image`; `None` when it is not a valid reference.
pub fn parse(image: &str) -> Option<Reference> {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest
        && !valid_digest(digest)
    {
        return None;
    }
    // A tag follows the last ':' after the last '/' (a ':' before it is a registry port).
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag
        && !valid_tag(tag)
    {
        return None;
    }
    let (registry, repository) = split_registry(name)?;
    if !repository.split('/').all(valid_path_component) || name.len() > 255 {
        return None;
    }
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_owned()
    };
    let registry = registry.to_owned();
    Some(match (tag, digest) {
        (Some(tag), Some(digest)) => Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into()),
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

/// `registry/rest` when the first component is a host (has a '.' or a ':', or is `localhost`).
fn split_registry(name: &str) -> Option<(&str, &str)> {
    match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            valid_host(first).then_some((first, rest))
        }
        _ => Some((DEFAULT_REGISTRY, name)),
    }
}

/// `host[:port]`: dot-separated labels of letters, digits and inner '-'; a numeric port.
fn valid_host(host: &str) -> bool {
    let (domain, port) = match host.rsplit_once(':') {
        Some((domain, port)) => (domain, Some(port)),
        None => (host, None),
    };
    let label = |l: &str| {
        !l.is_empty()
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    domain.split('.').all(label) && port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// `[a-z0-9]+` runs joined by one separator: '.', '_', "__" or any number of '-'.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    chars.next().is_some_and(word) && tag.len() <= 128 && chars.all(|c| word(c) || c == '.' || c == '-')
}

/// `algorithm:hex` with at least 32 hex digits.
fn valid_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    !algorithm.is_empty()
        && algorithm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c))
        && hex.len() >= 32
        && hex.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn agrees_with_the_regular_expression_of_oci_spec() {
        let cases = [
            "python".to_owned(),
            "library/python:3.11".to_owned(),
            "mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable:20240222.v4".to_owned(),
            "127.0.0.1:5000/team/runtime".to_owned(),
            "localhost/runtime:latest".to_owned(),
            "localhost:5000/a/b/c:v1".to_owned(),
            format!("registry.example.com/runtime@{DIGEST}"),
            format!("registry.example.com/runtime:20240501.v2@{DIGEST}"),
            "a__b/c-----d/e.f_g".to_owned(),
            "repo:".to_owned(),
            "repo:-tag".to_owned(),
            "repo/".to_owned(),
            "/repo".to_owned(),
            "re po".to_owned(),
            "a___b".to_owned(),
            "a.-b".to_owned(),
            "host:port/repo".to_owned(),
            "-host.com/repo".to_owned(),
            "repo@sha256:short".to_owned(),
            format!("repo:{}", "t".repeat(128)),
            format!("repo:{}", "t".repeat(129)),
            "".to_owned(),
        ];
        for image in cases {
            let ours = parse(&image);
            let theirs = image.parse::<Reference>().ok();
            assert_eq!(
                ours.is_some(),
                theirs.is_some(),
                "{image:?}: ours {ours:?}, oci-spec {theirs:?}"
            );
            if let (Some(ours), Some(theirs)) = (ours, theirs) {
                assert_eq!(ours.registry(), theirs.registry(), "{image}");
                assert_eq!(ours.repository(), theirs.repository(), "{image}");
                assert_eq!(ours.tag(), theirs.tag(), "{image}");
                assert_eq!(ours.digest(), theirs.digest(), "{image}");
            }
        }
    }

    #[test]
    fn an_uppercase_repository_is_refused_as_container_runtimes_refuse_it() {
        // oci-spec's expression reads `Uppercase` as a registry and then moves it into the
        // repository of docker.io; Docker and containerd refuse the name ("must be lowercase").
        assert!(parse("Uppercase/repo").is_none());
        assert!(parse("registry.example.com/Team/repo").is_none());
        assert_eq!(
            parse("Registry.Example.com/team/repo").unwrap().registry(),
            "Registry.Example.com"
        );
    }
}
