//! Reads a dhat heap profile (`make heap-profile`) and says where the bytes live at the moment the
//! heap was largest: allocation sites grouped by the cache they filled, or by the first frame that
//! is not allocator or collection plumbing.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Deserialize)]
struct Profile {
    pps: Vec<ProgramPoint>,
    ftbl: Vec<String>,
}

#[derive(Deserialize)]
struct ProgramPoint {
    /// Bytes live at the global peak.
    #[serde(default)]
    gb: u64,
    #[serde(default)]
    gbk: u64,
    fs: Vec<usize>,
}

/// Frames that say how memory was allocated, not what for (allocator, collections, serde).
const PLUMBING: [&str; 27] = [
    "dhat-0",
    "alloc/src",
    "core/src",
    "std/src",
    "raw_vec",
    "src/vec/",
    "hashbrown",
    "serde",
    "__rust_alloc",
    "boxed.rs",
    "sync.rs",
    "slice.rs",
    "string.rs",
    "btree",
    "clone",
    "to_vec",
    "to_owned",
    "from_str",
    "deserialize",
    "visit_",
    "next_value",
    "next_key",
    "fmt/",
    "collect",
    "from_iter",
    "extend",
    "[root]",
];

/// `(site, bytes, blocks)` at the global peak, largest first, at most `top` sites plus "other".
pub fn at_peak(path: &std::path::Path, top: usize) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let profile: Profile = serde_json::from_str(&text).expect("a dhat profile");
    let mut sites: HashMap<String, (u64, u64)> = HashMap::new();
    for pp in profile.pps.iter().filter(|pp| pp.gb > 0) {
        let frames: Vec<&str> = pp
            .fs
            .iter()
            .filter_map(|&i| profile.ftbl.get(i))
            .map(String::as_str)
            .collect();
        let site = label(&frames);
        let entry = sites.entry(site).or_default();
        entry.0 += pp.gb;
        entry.1 += pp.gbk;
    }
    let mut sorted: Vec<_> = sites.into_iter().map(|(site, (b, k))| (site, b, k)).collect();
    sorted.sort_by_key(|site| std::cmp::Reverse(site.1));
    if sorted.len() > top {
        let rest = sorted.split_off(top);
        let (bytes, blocks) = rest.iter().fold((0, 0), |(b, k), s| (b + s.1, k + s.2));
        sorted.push(("(the rest)".to_owned(), bytes, blocks));
    }
    sorted
}

/// What an allocation is for: the cache it went into (the reflector's `apply_watcher_event<K>`),
/// compiled regular expressions, or else the first frame that is not plumbing.
fn label(frames: &[&str]) -> String {
    for frame in frames {
        if let Some((_, rest)) = frame.split_once("apply_watcher_event<") {
            let kind = rest.split('>').next().unwrap_or(rest);
            return format!("cache of {}", kind.rsplit("::").next().unwrap_or(kind));
        }
    }
    if frames.iter().any(|f| f.contains("regex")) {
        return "compiled regular expressions".to_owned();
    }
    frames
        .iter()
        .find(|frame| !PLUMBING.iter().any(|p| frame.contains(p)))
        .map(|frame| {
            let text = frame.split_once(": ").map_or(*frame, |(_, rest)| rest);
            text.chars().take(100).collect()
        })
        .unwrap_or_else(|| "(allocator and collections only)".to_owned())
}
