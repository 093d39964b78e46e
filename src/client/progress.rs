//! Progress bars for sent and received bytes (indicatif), on stderr, only
//! when stderr is a terminal: scripts and tests see nothing of them.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Two bars, or none. Cheap to update from two threads.
#[derive(Clone)]
pub struct Progress {
    pub sent: Option<ProgressBar>,
    pub received: Option<ProgressBar>,
}

impl Progress {
    /// Bars for a transfer of `total` bytes each way, if `wanted` and stderr
    /// is a terminal.
    pub fn new(total: u64, wanted: bool) -> Self {
        if !wanted || !std::io::stderr().is_terminal() {
            return Progress {
                sent: None,
                received: None,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{bar:40}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let bar = |name: &str| {
            let b = multi.add(ProgressBar::new(total));
            b.set_style(style.clone());
            b.set_prefix(name.to_string());
            Some(b)
        };
        Progress {
            sent: bar("sent"),
            received: bar("received"),
        }
    }

    #[inline]
    pub fn add_sent(&self, n: u64) {
        if let Some(b) = &self.sent {
            b.inc(n);
        }
    }

    #[inline]
    pub fn add_received(&self, n: u64) {
        if let Some(b) = &self.received {
            b.inc(n);
        }
    }

    /// Removes the bars before the summary is printed.
    pub fn clear(&self) {
        for b in [&self.sent, &self.received].into_iter().flatten() {
            b.finish_and_clear();
        }
    }
}
