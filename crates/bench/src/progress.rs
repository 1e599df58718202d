//! Progress on stderr while the benchmark runs (indicatif), so that stdout keeps the table.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of measurement steps, with the step running now as its message.
///
/// When stderr is not a terminal the bar is hidden; each step is then printed as a line on
/// stderr instead, so that a log still shows where a run is.
#[derive(Debug)]
pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `steps` steps.
    pub(crate) fn new(steps: u64) -> Self {
        let bar = ProgressBar::new(steps);
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos:>2}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar }
    }

    /// Shows that `what` is being measured.
    pub(crate) fn begin(&self, what: impl Into<String>) {
        let what = what.into();
        if self.bar.is_hidden() {
            eprintln!("bench: {what}");
        }
        self.bar.set_message(what);
    }

    /// Marks the current step done.
    pub(crate) fn done(&self) {
        self.bar.inc(1);
    }

    /// Prints a line above the bar (warnings, skipped parts).
    pub(crate) fn note(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        if self.bar.is_hidden() {
            eprintln!("bench: {line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
