//! Figures, their baselines and targets; the printed table and `summary.json`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// What a figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Operations per second (higher is better).
    PerSecond,
    /// Microseconds (lower is better).
    Micros,
    /// Nanoseconds (lower is better).
    Nanos,
    /// Bytes (lower is better).
    Bytes,
    /// A plain count (lower is better).
    Count,
}

/// What a figure is held to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Target {
    /// Informational: no target.
    None,
    /// The ratio to the baseline must be at least this.
    RatioAtLeast(f64),
    /// The ratio to the baseline must be at most this.
    RatioAtMost(f64),
    /// The value itself must be below this (in the figure's unit).
    ValueBelow(f64),
    /// No verdict, with a reason printed instead (a feature not built yet, a missing tool).
    Note(String),
}

/// One line of the table.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    /// Stable machine name, the key in `summary.json` (`redis.adapter.c64.checks_per_s`).
    pub(crate) key: String,
    /// What a person reads.
    pub(crate) label: String,
    /// The measured value.
    pub(crate) value: f64,
    /// Its unit.
    pub(crate) unit: Unit,
    /// What it is compared with.
    pub(crate) baseline_label: String,
    /// The baseline's value, measured in the same run (None when it could not be measured).
    pub(crate) baseline: Option<f64>,
    /// The ratio, when it is not simply `value / baseline` (a median of paired rounds).
    pub(crate) ratio: Option<f64>,
    /// The target.
    pub(crate) target: Target,
}

/// The outcome of a figure against its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Target met.
    Pass,
    /// Target missed.
    Fail,
    /// No target, or no verdict possible.
    Info,
}

impl Figure {
    /// A figure without target; add one with [`Figure::target`].
    pub(crate) fn new(
        key: impl Into<String>,
        label: impl Into<String>,
        value: f64,
        unit: Unit,
        baseline_label: impl Into<String>,
        baseline: Option<f64>,
    ) -> Self {
        Self {
            key: key.into(),
            label: label.into(),
            value,
            unit,
            baseline_label: baseline_label.into(),
            baseline,
            ratio: None,
            target: Target::None,
        }
    }

    /// The same figure held to `target`.
    pub(crate) fn target(mut self, target: Target) -> Self {
        self.target = target;
        self
    }

    /// The same figure with an explicitly computed ratio (e.g. a median of paired rounds).
    pub(crate) fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        self
    }

    /// The ratio to the baseline: explicit, or `value / baseline`.
    pub(crate) fn ratio_value(&self) -> Option<f64> {
        self.ratio
            .or_else(|| self.baseline.map(|base| self.value / base))
            .filter(|r| r.is_finite())
    }

    /// Whether the target is met.
    pub(crate) fn verdict(&self) -> Verdict {
        let ratio = self.ratio_value();
        let ok = match (&self.target, ratio) {
            (Target::RatioAtLeast(min), Some(r)) => r >= *min,
            (Target::RatioAtMost(max), Some(r)) => r <= *max,
            (Target::ValueBelow(max), _) => self.value < *max,
            _ => return Verdict::Info,
        };
        if ok { Verdict::Pass } else { Verdict::Fail }
    }

    fn target_text(&self) -> String {
        match &self.target {
            Target::None => String::new(),
            Target::RatioAtLeast(min) => format!("≥ {min}x"),
            Target::RatioAtMost(max) => format!("≤ {max}x"),
            Target::ValueBelow(max) => format!("< {}", format_value(*max, self.unit)),
            Target::Note(note) => note.clone(),
        }
    }
}

/// A value in its unit, for people: `12.3k/s`, `85.1 µs`, `412 ns`, `196 B`.
pub(crate) fn format_value(value: f64, unit: Unit) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    match unit {
        Unit::PerSecond if value >= 1e6 => format!("{:.2}M/s", value / 1e6),
        Unit::PerSecond if value >= 1e3 => format!("{:.1}k/s", value / 1e3),
        Unit::PerSecond => format!("{value:.0}/s"),
        Unit::Micros if value >= 1e3 => format!("{:.2} ms", value / 1e3),
        Unit::Micros if value >= 100.0 => format!("{value:.0} µs"),
        Unit::Micros => format!("{value:.1} µs"),
        Unit::Nanos if value >= 1e4 => format!("{:.1} µs", value / 1e3),
        Unit::Nanos => format!("{value:.0} ns"),
        Unit::Bytes => format!("{value:.0} B"),
        Unit::Count => format!("{value:.0}"),
    }
}

/// A ratio for people, to three significant digits (so that `0.798x` does not read as a
/// passing `0.80x`): `0.934x`, `1.14x`, `10.4x`.
pub(crate) fn format_ratio(ratio: Option<f64>) -> String {
    match ratio {
        Some(r) if r >= 100.0 => format!("{r:.0}x"),
        Some(r) if r >= 10.0 => format!("{r:.1}x"),
        Some(r) if r >= 1.0 => format!("{r:.2}x"),
        Some(r) => format!("{r:.3}x"),
        None => "n/a".to_owned(),
    }
}

/// The table of figures as Markdown (aligned, so that it also reads well in a terminal).
pub(crate) fn table(figures: &[Figure]) -> String {
    let header = [
        "Figure",
        "Value",
        "Baseline",
        "Baseline value",
        "Ratio",
        "Target",
        "Result",
    ];
    let rows: Vec<[String; 7]> = figures
        .iter()
        .map(|f| {
            [
                f.label.clone(),
                format_value(f.value, f.unit),
                f.baseline_label.clone(),
                f.baseline
                    .map_or_else(|| "n/a".to_owned(), |b| format_value(b, f.unit)),
                format_ratio(f.ratio_value()),
                f.target_text(),
                match f.verdict() {
                    Verdict::Pass => "PASS".to_owned(),
                    Verdict::Fail => "FAIL".to_owned(),
                    Verdict::Info => "—".to_owned(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::from("|");
        for (cell, width) in cells.iter().zip(widths) {
            let pad = width - cell.chars().count();
            out.push(' ');
            out.push_str(cell);
            out.push_str(&" ".repeat(pad));
            out.push_str(" |");
        }
        out.push('\n');
        out
    };
    let mut out = line(&header.map(str::to_owned));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

/// `summary.json`: figure name → value, plus `.baseline`, `.ratio` and `.pass` (true/false,
/// for figures with a target) for each, and a few `run.*` entries describing the run.
pub(crate) fn summary(figures: &[Figure], run: &[(&str, Value)]) -> Value {
    let mut map = BTreeMap::new();
    for (name, value) in run {
        map.insert(format!("run.{name}"), value.clone());
    }
    for f in figures {
        map.insert(f.key.clone(), number(f.value));
        if let Some(base) = f.baseline {
            map.insert(format!("{}.baseline", f.key), number(base));
        }
        if let Some(ratio) = f.ratio_value() {
            map.insert(format!("{}.ratio", f.key), number(ratio));
        }
        match f.verdict() {
            Verdict::Pass => {
                map.insert(format!("{}.pass", f.key), json!(true));
            }
            Verdict::Fail => {
                map.insert(format!("{}.pass", f.key), json!(false));
            }
            Verdict::Info => {}
        }
    }
    json!(map)
}

/// A JSON number, or null for NaN and infinities (which JSON cannot hold).
fn number(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(value: f64, baseline: Option<f64>, target: Target) -> Figure {
        Figure::new("x", "x", value, Unit::PerSecond, "base", baseline).target(target)
    }

    #[test]
    fn values_and_ratios_are_formatted_for_people() {
        assert_eq!(format_value(1_234_567.0, Unit::PerSecond), "1.23M/s");
        assert_eq!(format_value(45_210.0, Unit::PerSecond), "45.2k/s");
        assert_eq!(format_value(812.0, Unit::PerSecond), "812/s");
        assert_eq!(format_value(85.14, Unit::Micros), "85.1 µs");
        assert_eq!(format_value(412.0, Unit::Micros), "412 µs");
        assert_eq!(format_value(2_500.0, Unit::Micros), "2.50 ms");
        assert_eq!(format_value(412.4, Unit::Nanos), "412 ns");
        assert_eq!(format_value(196.2, Unit::Bytes), "196 B");
        assert_eq!(format_value(f64::NAN, Unit::Bytes), "n/a");
        assert_eq!(format_ratio(Some(0.9341)), "0.934x");
        assert_eq!(format_ratio(Some(0.7981)), "0.798x");
        assert_eq!(format_ratio(Some(1.1412)), "1.14x");
        assert_eq!(format_ratio(Some(10.44)), "10.4x");
        assert_eq!(format_ratio(Some(1234.0)), "1234x");
        assert_eq!(format_ratio(None), "n/a");
    }

    #[test]
    fn verdicts_follow_targets() {
        assert_eq!(
            figure(95.0, Some(100.0), Target::RatioAtLeast(0.9)).verdict(),
            Verdict::Pass
        );
        assert_eq!(
            figure(85.0, Some(100.0), Target::RatioAtLeast(0.9)).verdict(),
            Verdict::Fail
        );
        assert_eq!(
            figure(130.0, Some(100.0), Target::RatioAtMost(1.2)).verdict(),
            Verdict::Fail
        );
        assert_eq!(
            figure(900.0, None, Target::ValueBelow(1000.0)).verdict(),
            Verdict::Pass
        );
        // No baseline: no verdict on a ratio target.
        assert_eq!(
            figure(1.0, None, Target::RatioAtLeast(0.8)).verdict(),
            Verdict::Info
        );
        // An explicit (paired) ratio wins over value / baseline.
        let paired = figure(80.0, Some(100.0), Target::RatioAtLeast(0.9)).ratio(0.95);
        assert_eq!(paired.verdict(), Verdict::Pass);
    }

    #[test]
    fn table_is_aligned_markdown_and_summary_is_flat() {
        let figures = [
            figure(95.0, Some(100.0), Target::RatioAtLeast(0.9)),
            figure(1.0, None, Target::Note("not implemented yet".to_owned())),
        ];
        let text = table(&figures);
        let widths: Vec<usize> = text.lines().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(text.contains("| PASS"));
        assert!(text.contains("not implemented yet"));

        let json = summary(&figures[..1], &[("quick", json!(true))]);
        assert_eq!(json["x"], json!(95.0));
        assert_eq!(json["x.baseline"], json!(100.0));
        assert_eq!(json["x.ratio"], json!(0.95));
        assert_eq!(json["x.pass"], json!(true));
        assert_eq!(json["run.quick"], json!(true));
    }
}
