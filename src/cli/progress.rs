//! Progress while an action waits: a spinner with the latest state on a terminal, one plain line
//! per change otherwise (logs, CI), both on stderr so stdout keeps only the result.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shows what an action waits for.
pub struct Progress {
    spinner: Option<ProgressBar>,
    last: String,
}

impl Progress {
    /// A spinner when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        let spinner = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(ProgressStyle::with_template("{spinner} {elapsed:>3} {wide_msg}").expect("a valid template"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            spinner,
            last: String::new(),
        }
    }

    /// The state now; a plain line only when it changed.
    pub fn update(&mut self, message: &str) {
        if message == self.last {
            return;
        }
        message.clone_into(&mut self.last);
        match &self.spinner {
            Some(bar) => bar.set_message(message.to_owned()),
            None => eprintln!("… {message}"),
        }
    }

    /// Removes the spinner before the result is printed.
    pub fn finish(&self) {
        if let Some(bar) = &self.spinner {
            bar.finish_and_clear();
        }
    }
}
