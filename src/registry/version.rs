//! Runtime versions: tags like `20240222.v4`, ordered by date and then by the number after `v`.
//! Other tags (`latest`, `dev`, `20240222`) are not versions and are ignored. Pure.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A runtime version `YYYYMMDD.vN`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    date: u32,
    build: u64,
    text: String,
}

impl Version {
    /// The tag as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Version {
    type Err = ();

    /// Accepts exactly eight digits of a plausible date (month 01–12, day 01–31), `.v`, and a
    /// number without a leading zero.
    fn from_str(tag: &str) -> Result<Self, ()> {
        let (date, build) = tag.split_once(".v").ok_or(())?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if date.len() != 8 || !digits(date) || !digits(build) || (build.len() > 1 && build.starts_with('0')) {
            return Err(());
        }
        let month: u32 = date[4..6].parse().map_err(|_| ())?;
        let day: u32 = date[6..8].parse().map_err(|_| ())?;
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return Err(());
        }
        Ok(Self {
            date: date.parse().map_err(|_| ())?,
            build: build.parse().map_err(|_| ())?,
            text: tag.to_owned(),
        })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.date, self.build).cmp(&(other.date, other.build))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The newest version among `tags`, skipping the `denied` ones and tags that are not versions.
pub fn newest_allowed<'a>(tags: impl IntoIterator<Item = &'a str>, denied: &[String]) -> Option<Version> {
    tags.into_iter()
        .filter(|tag| !denied.iter().any(|d| d == tag))
        .filter_map(|tag| tag.parse::<Version>().ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(tag: &str) -> Version {
        tag.parse().unwrap()
    }

    #[test]
    fn orders_by_date_then_build_number() {
        assert!(v("20240222.v4") < v("20240222.v10"), "numeric, not lexical");
        assert!(v("20240222.v10") < v("20240501.v2"));
        assert!(v("20231231.v99") < v("20240101.v1"));
    }

    #[test]
    fn other_tags_are_not_versions() {
        for tag in [
            "latest",
            "20240222",
            "20240222.v",
            "20240222.v04",
            "2024022.v1",
            "20241301.v1",
            "20240222.v4-rc1",
            "x20240222.v4",
            "",
        ] {
            assert!(tag.parse::<Version>().is_err(), "{tag}");
        }
    }

    #[test]
    fn the_newest_allowed_skips_denied_and_foreign_tags() {
        let tags = ["20240101.v1", "20240222.v4", "20240501.v2", "20241214.v1", "latest"];
        let denied = vec!["20241214.v1".to_owned()];
        assert_eq!(newest_allowed(tags, &denied), Some(v("20240501.v2")));
        assert_eq!(newest_allowed(tags, &[]), Some(v("20241214.v1")));
        assert_eq!(newest_allowed(["latest"], &[]), None);
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips(tag in "\\PC{0,24}") {
            if let Ok(version) = tag.parse::<Version>() {
                prop_assert_eq!(version.as_str(), tag.as_str());
            }
        }

        #[test]
        fn order_agrees_with_date_and_number(
            (y1, m1, d1, n1) in (2000u32..2100, 1u32..13, 1u32..29, 0u64..100_000),
            (y2, m2, d2, n2) in (2000u32..2100, 1u32..13, 1u32..29, 0u64..100_000),
        ) {
            let a = v(&format!("{y1:04}{m1:02}{d1:02}.v{n1}"));
            let b = v(&format!("{y2:04}{m2:02}{d2:02}.v{n2}"));
            let expected = (y1, m1, d1, n1).cmp(&(y2, m2, d2, n2));
            prop_assert_eq!(a.cmp(&b), expected);
        }

        #[test]
        fn the_newest_is_never_denied_and_never_older_than_an_allowed_tag(
            builds in proptest::collection::vec((1u32..29, 0u64..50), 0..40),
            denied_index in 0usize..40,
        ) {
            let tags: Vec<String> = builds.iter().map(|(d, n)| format!("202401{d:02}.v{n}")).collect();
            let denied: Vec<String> = tags.get(denied_index).cloned().into_iter().collect();
            let newest = newest_allowed(tags.iter().map(String::as_str), &denied);
            for tag in tags.iter().filter(|t| !denied.contains(t)) {
                prop_assert!(newest.as_ref().is_some_and(|n| *n >= v(tag)));
            }
            if let Some(newest) = newest {
                prop_assert!(!denied.contains(&newest.to_string()));
            }
        }
    }
}
