//! Tables the way kubectl prints them: upper-case headers, columns three spaces apart, `<none>`
//! for nothing; ages and deadlines in kubectl's short form. Pure.

use std::time::Duration;

use jiff::Timestamp;

/// Renders `rows` under `headers`, each column as wide as its widest cell.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, width)) in cells.into_iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                out.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 3));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// kubectl's short duration: `45s`, `12m`, `3h20m`, `5d`.
pub fn short(duration: Duration) -> String {
    let s = duration.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..172_800 if s % 3600 >= 60 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        10_800..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// How long ago `then` was.
pub fn age(then: Timestamp, now: Timestamp) -> String {
    short(crate::idle::until(then, now))
}

/// When `then` comes: `in 12m`, or `due` once past.
pub fn until(then: Timestamp, now: Timestamp) -> String {
    if then <= now {
        "due".into()
    } else {
        format!("in {}", short(crate::idle::until(now, then)))
    }
}

/// The cell for an optional value.
pub fn cell(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or("<none>").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell_and_the_last_has_no_padding() {
        let table = render(
            &["NAME", "PHASE"],
            &[
                vec!["chat".into(), "Running".into()],
                vec!["summarizer".into(), "Not available".into()],
            ],
        );
        assert_eq!(
            table,
            "NAME         PHASE\nchat         Running\nsummarizer   Not available\n"
        );
    }

    #[test]
    fn durations_read_like_kubectls() {
        let d = Duration::from_secs;
        assert_eq!(
            [
                short(d(5)),
                short(d(150)),
                short(d(3000)),
                short(d(4 * 3600 + 300)),
                short(d(3 * 86400))
            ],
            ["5s", "2m30s", "50m", "4h5m", "3d"]
        );
        let now = Timestamp::from_second(10_000).unwrap();
        assert_eq!(until(Timestamp::from_second(9_000).unwrap(), now), "due");
        assert_eq!(until(Timestamp::from_second(10_600).unwrap(), now), "in 10m");
        assert_eq!(age(Timestamp::from_second(9_990).unwrap(), now), "10s");
    }
}
