//! Progress of a long phase: a bar with rate, ETA and position on a
//! terminal (`indicatif`), and a plain line every few seconds otherwise
//! (CI logs, `nohup`), so a rebuild of hours never looks hung.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    name: String,
    unit: &'static str,
    bar: Option<ProgressBar>,
    plain: Mutex<Plain>,
}

struct Plain {
    position: u64,
    total: u64,
    message: String,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// A phase of `total` `unit`s (events, rows, partitions).
    pub fn new(name: &str, total: u64, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {human_pos}/{human_len} {msg} {per_sec} ETA {eta} ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name.to_string());
            bar
        });
        let now = Instant::now();
        Self {
            name: name.to_string(),
            unit,
            bar,
            plain: Mutex::new(Plain {
                position: 0,
                total,
                message: String::new(),
                started: now,
                last_line: now,
            }),
        }
    }

    pub fn inc(&self, n: u64) {
        let position = self.plain().position + n;
        self.set_position(position);
    }

    pub fn set_position(&self, position: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
        }
        let mut plain = self.plain();
        plain.position = position;
        if self.bar.is_none() && plain.last_line.elapsed() >= PLAIN_EVERY {
            plain.last_line = Instant::now();
            eprintln!("{}", line(&self.name, self.unit, &plain));
        }
    }

    /// What is being done now (a month, a partition and offset).
    pub fn set_message(&self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.clone());
        }
        self.plain().message = message;
    }

    pub fn finish(&self, summary: &str) {
        let plain = self.plain();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = plain.started.elapsed().as_secs_f64();
        let rate = plain.position as f64 / secs.max(1e-9);
        eprintln!(
            "{:>10} done: {} {} in {:.1} s ({:.0} {}/s){}",
            self.name,
            plain.position,
            self.unit,
            secs,
            rate,
            self.unit,
            if summary.is_empty() {
                String::new()
            } else {
                format!("; {summary}")
            }
        );
    }

    fn plain(&self) -> std::sync::MutexGuard<'_, Plain> {
        self.plain.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn line(name: &str, unit: &str, p: &Plain) -> String {
    let secs = p.started.elapsed().as_secs_f64();
    let rate = p.position as f64 / secs.max(1e-9);
    let eta = if rate > 0.0 && p.total > p.position {
        format!("{:.0} s", (p.total - p.position) as f64 / rate)
    } else {
        "-".to_string()
    };
    format!(
        "{name:>10}: {}/{} {unit} ({:.0}/s, ETA {eta}) {}",
        p.position, p.total, rate, p.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_says_position_rate_and_eta() {
        let p = Plain {
            position: 50,
            total: 100,
            message: "month 202611".into(),
            started: Instant::now() - Duration::from_secs(10),
            last_line: Instant::now(),
        };
        let l = line("raw", "events", &p);
        assert!(l.contains("50/100 events"), "{l}");
        assert!(l.contains("ETA 10 s"), "{l}");
        assert!(l.ends_with("month 202611"), "{l}");
    }
}
