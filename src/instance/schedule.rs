//! ComputeInstance schedules: when the next Start or Stop is due, and which one should have
//! happened most recently. Pure; cron expressions are five fields, read with Vixie-cron rules
//! (a day-of-month and a day-of-week that are both restricted match when either does), each in
//! its schedule's IANA time zone.
//!
//! When two schedules fire at the same instant, Start wins over Stop: a tie never stops a
//! machine. Daylight saving time follows croner: a fixed time in a spring-forward gap fires once,
//! at the first real instant after the gap (02:30 in Berlin on the day clocks jump 02:00 → 03:00
//! fires at 03:00 CEST), and a fixed time that happens twice in a fall-back overlap fires once,
//! at the earlier of the two instants. Stepped or wildcard times inside a gap are skipped.

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::api::{Schedule, ScheduleAction};

/// A schedule that parsed: its index in `spec.schedules`, its action, its cron and its zone.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The schedule's index in `spec.schedules`.
    pub index: usize,
    /// What the schedule does.
    pub action: ScheduleAction,
    cron: Cron,
    tz: TimeZone,
}

/// Why a schedule could not be used. The message names the field, e.g.
/// `spec.schedules[1].timeZone "Mars/Olympus" is not an IANA time zone`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ScheduleProblem {
    /// The schedule's index in `spec.schedules`.
    pub index: usize,
    /// A sentence naming the field and what is wrong with it.
    pub message: String,
}

impl Compiled {
    /// This schedule's first trigger strictly after `after`.
    fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let zoned = after.to_zoned(self.tz.clone());
        let found = self.cron.find_next_occurrence(&zoned, false).ok()?.timestamp();
        (found > after).then_some(found)
    }

    /// This schedule's last trigger at or before `to`.
    fn latest_until(&self, to: Timestamp) -> Option<Timestamp> {
        let zoned = to.to_zoned(self.tz.clone());
        let found = self.cron.find_previous_occurrence(&zoned, true).ok()?.timestamp();
        (found <= to).then_some(found)
    }
}

/// The parser for `spec.schedules[].cron`: exactly five fields (no seconds), and croner's default
/// day matching, which is Vixie cron's OR of day-of-month and day-of-week.
fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .dom_and_dow(false)
        .build()
}

/// Compiles every schedule: the good ones, and a problem per bad one (a bad schedule never fails
/// the others). A schedule with a bad cron is reported for its cron only.
pub fn compile(schedules: &[Schedule]) -> (Vec<Compiled>, Vec<ScheduleProblem>) {
    let parser = parser();
    let mut compiled = Vec::new();
    let mut problems = Vec::new();
    for (index, schedule) in schedules.iter().enumerate() {
        let cron = match parser.parse(&schedule.cron) {
            Ok(cron) => cron,
            Err(error) => {
                let message = format!("spec.schedules[{index}].cron {:?}: {error}", schedule.cron);
                problems.push(ScheduleProblem { index, message });
                continue;
            }
        };
        let Ok(tz) = TimeZone::get(&schedule.time_zone) else {
            let message = format!(
                "spec.schedules[{index}].timeZone {:?} is not an IANA time zone",
                schedule.time_zone
            );
            problems.push(ScheduleProblem { index, message });
            continue;
        };
        compiled.push(Compiled {
            index,
            action: schedule.action,
            cron,
            tz,
        });
    }
    (compiled, problems)
}

/// The next trigger strictly after `after` across all schedules; Start wins a tie.
pub fn next(compiled: &[Compiled], after: Timestamp) -> Option<(ScheduleAction, Timestamp)> {
    compiled
        .iter()
        .filter_map(|c| c.next_after(after).map(|time| (c.action, time)))
        .min_by_key(|&(action, time)| (time, action == ScheduleAction::Stop))
}

/// The latest trigger in the window (`from`, `to`] across all schedules: what should have
/// happened most recently. Start wins a tie.
pub fn latest_in(compiled: &[Compiled], from: Timestamp, to: Timestamp) -> Option<(ScheduleAction, Timestamp)> {
    if from >= to {
        return None;
    }
    compiled
        .iter()
        .filter_map(|c| {
            c.latest_until(to)
                .filter(|&time| time > from)
                .map(|time| (c.action, time))
        })
        .max_by_key(|&(action, time)| (time, action == ScheduleAction::Start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScheduleAction::{Start, Stop};

    type Trigger = Option<(ScheduleAction, Timestamp)>;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn hit(action: ScheduleAction, time: &str) -> Trigger {
        Some((action, at(time)))
    }

    /// Each case: strictly after the first instant, the next trigger is the action at the second.
    fn assert_next(compiled: &[Compiled], cases: &[(&str, ScheduleAction, &str)]) {
        for &(after, action, time) in cases {
            assert_eq!(
                next(compiled, at(after)),
                Some((action, at(time))),
                "next after {after}"
            );
        }
    }

    fn latest(compiled: &[Compiled], from: &str, to: &str) -> Trigger {
        latest_in(compiled, at(from), at(to))
    }

    fn schedule(action: ScheduleAction, cron: &str, time_zone: &str) -> Schedule {
        Schedule {
            action,
            cron: cron.to_owned(),
            time_zone: time_zone.to_owned(),
        }
    }

    fn compiled(schedules: &[Schedule]) -> Vec<Compiled> {
        let (compiled, problems) = compile(schedules);
        assert!(problems.is_empty(), "{problems:?}");
        compiled
    }

    #[test]
    fn weekdays_skip_the_weekend_and_days_match_as_in_vixie_cron() {
        let c = compiled(&[schedule(Stop, "0 19 * * 1-5", "UTC")]);
        // Friday 2026-11-27 after 19:00 → Monday.
        assert_next(&c, &[("2026-11-27T20:00:00Z", Stop, "2026-11-30T19:00:00Z")]);
        // Monday or the 1st (not Monday the 1st): Monday 2026-11-30, then Tuesday 2026-12-01.
        let c = compiled(&[schedule(Start, "0 12 1 * 1", "UTC")]);
        let cases = [
            ("2026-11-27T20:00:00Z", Start, "2026-11-30T12:00:00Z"),
            ("2026-11-30T12:00:00Z", Start, "2026-12-01T12:00:00Z"),
        ];
        assert_next(&c, &cases);
    }

    #[test]
    fn follows_the_zone_across_daylight_saving_changes() {
        let c = compiled(&[schedule(Start, "0 8 * * *", "Europe/Berlin")]);
        let cases = [
            // 2026-03-29: CEST (UTC+2) from 02:00 local.
            ("2026-03-28T12:00:00Z", Start, "2026-03-29T06:00:00Z"),
            // 2026-10-25: CET (UTC+1) from 03:00 local.
            ("2026-10-24T12:00:00Z", Start, "2026-10-25T07:00:00Z"),
        ];
        assert_next(&c, &cases);
    }

    #[test]
    fn a_time_in_the_spring_forward_gap_fires_once_just_after_it() {
        // Berlin 2026-03-29 02:30 does not exist; croner fires at the first real instant after
        // the gap, 03:00 CEST = 01:00Z, and once only. The days around it are plain 02:30.
        let c = compiled(&[schedule(Start, "30 2 * * *", "Europe/Berlin")]);
        let cases = [
            ("2026-03-27T12:00:00Z", Start, "2026-03-28T01:30:00Z"),
            ("2026-03-28T12:00:00Z", Start, "2026-03-29T01:00:00Z"),
            ("2026-03-29T01:00:00Z", Start, "2026-03-30T00:30:00Z"),
        ];
        assert_next(&c, &cases);
        let day = latest(&c, "2026-03-28T23:00:00Z", "2026-03-29T23:00:00Z");
        assert_eq!(day, hit(Start, "2026-03-29T01:00:00Z"));
    }

    #[test]
    fn a_time_in_the_fall_back_overlap_fires_once_at_the_earlier_instant() {
        // New York 2026-11-01 01:30 happens at 05:30Z (EDT) and 06:30Z (EST); it fires at 05:30Z.
        let c = compiled(&[schedule(Stop, "30 1 * * *", "America/New_York")]);
        let cases = [
            ("2026-10-31T12:00:00Z", Stop, "2026-11-01T05:30:00Z"),
            ("2026-11-01T05:30:00Z", Stop, "2026-11-02T06:30:00Z"),
            // From inside the repeated hour, the second 01:30 is not a trigger either.
            ("2026-11-01T06:00:00Z", Stop, "2026-11-02T06:30:00Z"),
        ];
        assert_next(&c, &cases);
        let day = latest(&c, "2026-11-01T00:00:00Z", "2026-11-01T12:00:00Z");
        assert_eq!(day, hit(Stop, "2026-11-01T05:30:00Z"));
    }

    #[test]
    fn next_picks_the_earliest_schedule_and_start_wins_a_tie() {
        let stop = schedule(Stop, "0 19 * * *", "Europe/Berlin");
        let c = compiled(&[stop, schedule(Start, "0 8 * * *", "Europe/Berlin")]);
        let cases = [
            ("2026-11-27T20:00:00Z", Start, "2026-11-28T07:00:00Z"),
            ("2026-11-28T10:00:00Z", Stop, "2026-11-28T18:00:00Z"),
        ];
        assert_next(&c, &cases);

        // 07:00 UTC is 08:00 CET: both fire at once, whatever their order.
        let stop = schedule(Stop, "0 7 * * *", "UTC");
        let start = schedule(Start, "0 8 * * *", "Europe/Berlin");
        let tie = [("2026-11-28T00:00:00Z", Start, "2026-11-28T07:00:00Z")];
        assert_next(&compiled(&[stop.clone(), start.clone()]), &tie);
        assert_next(&compiled(&[start, stop]), &tie);
    }

    #[test]
    fn latest_in_picks_the_most_recent_trigger_in_the_window() {
        let stop = schedule(Stop, "0 19 * * *", "Europe/Berlin");
        let c = compiled(&[stop, schedule(Start, "0 8 * * *", "Europe/Berlin")]);
        let got = latest(&c, "2026-11-27T00:00:00Z", "2026-11-28T12:00:00Z");
        assert_eq!(got, hit(Start, "2026-11-28T07:00:00Z"));
        // `to` is inclusive, `from` exclusive; an empty or reversed window has nothing.
        let got = latest(&c, "2026-11-27T00:00:00Z", "2026-11-27T18:00:00Z");
        assert_eq!(got, hit(Stop, "2026-11-27T18:00:00Z"));
        assert_eq!(latest(&c, "2026-11-27T18:00:00Z", "2026-11-28T06:59:59Z"), None);
        assert_eq!(latest(&c, "2026-11-28T12:00:00Z", "2026-11-28T12:00:00Z"), None);
        assert_eq!(latest(&c, "2026-11-28T12:00:00Z", "2026-11-27T00:00:00Z"), None);

        let stop = schedule(Stop, "0 7 * * *", "UTC");
        let tie = compiled(&[schedule(Start, "0 8 * * *", "Europe/Berlin"), stop]);
        let got = latest(&tie, "2026-11-27T12:00:00Z", "2026-11-28T12:00:00Z");
        assert_eq!(got, hit(Start, "2026-11-28T07:00:00Z"));
    }

    #[test]
    fn compile_reports_bad_schedules_by_index_and_keeps_the_good_ones() {
        let (compiled, problems) = compile(&[
            schedule(Stop, "0 19 * * 1-5", "UTC"),
            schedule(Start, "0 8 * * *", "Mars/Olympus"),
            schedule(Start, "0 25 * * *", "UTC"),
            schedule(Stop, "0 0 19 * * 1-5", "UTC"), // a seconds field: five fields only
            schedule(Start, "0 8 * * 1-5", "Europe/Berlin"),
        ]);
        let kept: Vec<_> = compiled.iter().map(|c| (c.index, c.action)).collect();
        assert_eq!(kept, vec![(0, Stop), (4, Start)]);
        let indices: Vec<_> = problems.iter().map(|p| p.index).collect();
        assert_eq!(indices, vec![1, 2, 3]);
        // The message is the field, then croner's words after ": ".
        let fields: Vec<_> = problems
            .iter()
            .map(|p| p.to_string().split(": ").next().unwrap().to_owned())
            .collect();
        let want = [
            "spec.schedules[1].timeZone \"Mars/Olympus\" is not an IANA time zone",
            "spec.schedules[2].cron \"0 25 * * *\"",
            "spec.schedules[3].cron \"0 0 19 * * 1-5\"",
        ];
        assert_eq!(fields, want);
    }
}
