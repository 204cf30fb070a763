//! Manifest errors that point at the line: each problem is rendered by miette
//! with the file, line and column and the offending text underlined.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use miette::{
    GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteDiagnostic, NamedSource, Severity,
};

use super::Span;

/// One problem in the manifest (or of the manifest against the database).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub span: Span,
    /// Short text under the underline.
    pub label: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl Problem {
    pub fn new(span: Span, message: impl Into<String>, label: impl Into<String>) -> Problem {
        Problem {
            message: message.into(),
            span,
            label: label.into(),
            help: None,
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Problem {
        self.help = Some(help.into());
        self
    }
}

/// Every problem found in a manifest. Exit code 2.
#[derive(Debug)]
pub struct ManifestError {
    pub path: PathBuf,
    pub source: String,
    pub problems: Vec<Problem>,
}

impl ManifestError {
    pub fn new(path: &Path, source: &str, mut problems: Vec<Problem>) -> ManifestError {
        // In file order, whatever order they were found in.
        problems.sort_by_key(|p| (p.span.start, p.span.end));
        ManifestError {
            path: path.to_path_buf(),
            source: source.to_string(),
            problems,
        }
    }

    /// `file:line:column` of a problem (1-based), for plain-text consumers.
    pub fn location(&self, problem: &Problem) -> String {
        let before = &self.source[..problem.span.start.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        format!("{}:{line}:{column}", self.path.display())
    }
}

impl std::error::Error for ManifestError {}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme)
            .with_width(100)
            .with_wrap_lines(false);
        let name = self.path.display().to_string();
        for (i, p) in self.problems.iter().enumerate() {
            let mut diag = MietteDiagnostic::new(format!("{} ({})", p.message, self.location(p)))
                .with_severity(Severity::Error)
                .with_label(LabeledSpan::at(p.span.clone(), p.label.clone()));
            if let Some(h) = &p.help {
                diag = diag.with_help(h.clone());
            }
            let report = miette::Report::new(diag)
                .with_source_code(NamedSource::new(name.clone(), self.source.clone()));
            let mut out = String::new();
            handler
                .render_report(&mut out, report.as_ref())
                .map_err(|_| std::fmt::Error)?;
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", out.trim_end())?;
        }
        let n = self.problems.len();
        write!(
            f,
            "\n\nerror: found {n} problem{} in {}; nothing was changed",
            if n == 1 { "" } else { "s" },
            self.path.display()
        )
    }
}
