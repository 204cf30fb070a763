//! Progress of projectors being played: an indicatif bar per projector on a
//! terminal, a plain line per projector every 10 s (and at the end) in CI
//! logs, nothing with `-q`. Always on stderr.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Bars,
    Lines,
    Quiet,
}

/// How often plain lines are printed.
const LINE_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Progress {
    style: Style,
    command: &'static str,
    multi: Option<MultiProgress>,
}

impl Progress {
    pub fn new(style: Style, command: &'static str) -> Progress {
        let multi = (style == Style::Bars)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        Progress {
            style,
            command,
            multi,
        }
    }

    /// Chooses bars on a terminal, lines elsewhere, nothing when quiet.
    pub fn auto(quiet: bool, command: &'static str) -> Progress {
        use std::io::IsTerminal;
        let style = if quiet {
            Style::Quiet
        } else if std::io::stderr().is_terminal() {
            Style::Bars
        } else {
            Style::Lines
        };
        Progress::new(style, command)
    }

    pub fn projector(&self, name: &str) -> ProjectorProgress {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>18.bold} [{bar:30.cyan/blue}] {human_pos:>10}/{human_len:<10} {per_sec:>14} ETA {eta:<4} {msg}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            bar.set_prefix(name.to_string());
            bar
        });
        ProjectorProgress {
            name: name.to_string(),
            command: self.command,
            style: self.style,
            bar,
            lines: Arc::new(Mutex::new(Lines {
                waiting: None,
                started: Instant::now(),
                last_print: Instant::now(),
                start: None,
                position: 0,
                target: 0,
            })),
        }
    }
}

struct Lines {
    /// Why it has not started (waiting for its turn).
    waiting: Option<String>,
    started: Instant,
    last_print: Instant,
    start: Option<i64>,
    position: i64,
    target: i64,
}

/// One projector's progress, in positions.
#[derive(Clone)]
pub struct ProjectorProgress {
    name: String,
    command: &'static str,
    style: Style,
    bar: Option<ProgressBar>,
    lines: Arc<Mutex<Lines>>,
}

impl ProjectorProgress {
    fn lines(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// It has not started yet, and why (said instead of "0% at position 0").
    pub fn waiting(&self, why: &str) {
        let mut l = self.lines();
        l.waiting = Some(why.to_string());
        if let Some(b) = &self.bar {
            b.set_message(why.to_string());
        }
        if self.style == Style::Lines {
            l.last_print = Instant::now();
            eprintln!("{}", self.line(&l, None));
        }
    }

    pub fn set_target(&self, target: i64) {
        let mut l = self.lines();
        l.waiting = None;
        l.target = target;
        let position = l.position;
        if l.start.is_none() {
            l.started = Instant::now();
        }
        let start = *l.start.get_or_insert(position);
        if let Some(b) = &self.bar {
            b.set_length((target - start).max(0) as u64);
        }
    }

    pub fn set_position(&self, position: i64) {
        let mut l = self.lines();
        if l.waiting.take().is_some()
            && let Some(b) = &self.bar
        {
            b.set_message("");
        }
        l.position = position;
        if l.start.is_none() {
            l.started = Instant::now();
        }
        let start = *l.start.get_or_insert(position);
        if let Some(b) = &self.bar {
            b.set_position((position - start).max(0) as u64);
        }
        if self.style == Style::Lines && l.last_print.elapsed() >= LINE_EVERY {
            l.last_print = Instant::now();
            eprintln!("{}", self.line(&l, None));
        }
    }

    pub fn finish(&self, state: &str) {
        let l = self.lines();
        match self.style {
            Style::Bars => {
                if let Some(b) = &self.bar {
                    b.finish_with_message(state.to_string());
                }
            }
            Style::Lines => eprintln!("{}", self.line(&l, Some(state))),
            Style::Quiet => {}
        }
    }

    fn line(&self, l: &Lines, done: Option<&str>) -> String {
        let start = l.start.unwrap_or(l.position);
        let done_events = (l.position - start).max(0);
        let secs = l.started.elapsed().as_secs_f64().max(0.001);
        let rate = done_events as f64 / secs;
        match done {
            Some(state) => format!(
                "{} {}: {state} at position {} ({done_events} positions in {secs:.1}s)",
                self.command, self.name, l.position
            ),
            None if l.waiting.is_some() => format!(
                "{} {}: {}",
                self.command,
                self.name,
                l.waiting.as_deref().unwrap_or_default()
            ),
            None => {
                let total = (l.target - start).max(1);
                let left = (l.target - l.position).max(0);
                let eta = if rate > 0.0 {
                    format!("{:.0}s", left as f64 / rate)
                } else {
                    "?".into()
                };
                format!(
                    "{} {}: {:.0}% at position {} of {}, {:.0} positions/s, ETA {eta}",
                    self.command,
                    self.name,
                    100.0 * done_events as f64 / total as f64,
                    l.position,
                    l.target,
                    rate
                )
            }
        }
    }
}
