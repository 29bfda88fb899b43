//! Config diagnostics: one shape for every mistake, three ways to print it.
//!
//! Every diagnostic has a stable code (`tollgate::unknown_directive`), a
//! lowercase headline naming the thing in backticks, a primary label on the
//! exact span, secondary labels where a second place helps ("first defined
//! here"), and a `help` that says the fix. Validators push into a
//! [`Diagnostics`] list and never stop at the first problem.
//!
//! Rendering: `human` is miette's graphical report; `json` and `github` are
//! computed here from the [`SourceMap`] (miette's own JSON has byte offsets
//! only, and `check --format json` promises lines and columns).

use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

use crate::config::source::{SourceMap, Span};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub span: Span,
    pub text: String,
}

/// One problem found in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Stable code without the `tollgate::` prefix, e.g. `unknown_directive`.
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    /// The primary label: the exact span of the offending token.
    pub span: Span,
    pub label: String,
    pub secondary: Vec<Label>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            severity: Severity::Error,
            message: message.into(),
            span,
            label: String::new(),
            secondary: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, span, message)
        }
    }

    /// The text of the primary label.
    pub fn label(mut self, text: impl Into<String>) -> Diagnostic {
        self.label = text.into();
        self
    }

    pub fn help(mut self, text: impl Into<String>) -> Diagnostic {
        self.help = Some(text.into());
        self
    }

    pub fn secondary(mut self, span: Span, text: impl Into<String>) -> Diagnostic {
        self.secondary.push(Label {
            span,
            text: text.into(),
        });
        self
    }

    pub fn full_code(&self) -> String {
        format!("tollgate::{}", self.code)
    }
}

/// The list validators push into.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    list: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new() -> Diagnostics {
        Diagnostics::default()
    }

    pub fn push(&mut self, d: Diagnostic) {
        self.list.push(d);
    }

    pub fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn error_count(&self) -> usize {
        self.list
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    pub fn warning_count(&self) -> usize {
        self.list.len() - self.error_count()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.list.iter()
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.list.extend(other.list);
    }

    /// Sorted by file, then position, errors before warnings at one place;
    /// exact duplicates removed.
    pub fn sorted(&self) -> Vec<Diagnostic> {
        let mut v = self.list.clone();
        v.sort_by(|a, b| {
            (a.span.file, a.span.start, a.span.end, b.severity, a.code).cmp(&(
                b.span.file,
                b.span.start,
                b.span.end,
                a.severity,
                b.code,
            ))
        });
        v.dedup();
        v
    }

    pub fn into_vec(self) -> Vec<Diagnostic> {
        self.list
    }
}

/// One diagnostic in `check --format json` (LANGUAGE.md §13.13).
#[derive(Debug, Serialize)]
pub struct JsonDiagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub severity: Severity,
    pub code: String,
    pub message: String,
    pub help: Option<String>,
}

pub fn to_json(diags: &[Diagnostic], sources: &SourceMap) -> Vec<JsonDiagnostic> {
    diags
        .iter()
        .map(|d| {
            let (start, end) = sources.line_col(d.span);
            JsonDiagnostic {
                file: sources.path(d.span.file).display().to_string(),
                line: start.line,
                column: start.column,
                end_line: end.line,
                end_column: end.column,
                severity: d.severity,
                code: d.full_code(),
                message: d.message.clone(),
                help: d.help.clone(),
            }
        })
        .collect()
}

/// GitHub workflow-command escaping for a message.
fn gh_escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// GitHub workflow-command escaping for a property value.
fn gh_escape_property(s: &str) -> String {
    gh_escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// `::error file=F,line=L,col=C,endLine=..,endColumn=..,title=CODE::MESSAGE`
pub fn to_github(diags: &[Diagnostic], sources: &SourceMap) -> String {
    let mut out = String::new();
    for d in diags {
        let (start, end) = sources.line_col(d.span);
        let kind = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut msg = d.message.clone();
        if let Some(h) = &d.help {
            msg.push_str("\nhelp: ");
            msg.push_str(h);
        }
        let _ = writeln!(
            out,
            "::{kind} file={},line={},col={},endLine={},endColumn={},title={}::{}",
            gh_escape_property(&sources.path(d.span.file).display().to_string()),
            start.line,
            start.column,
            end.line,
            end.column,
            gh_escape_property(&d.full_code()),
            gh_escape_data(&msg),
        );
    }
    out
}

/// A diagnostic bound to its source, for miette's graphical handler.
#[derive(Debug)]
pub struct Report {
    code: String,
    severity: Severity,
    message: String,
    help: Option<String>,
    source: miette::NamedSource<Lines>,
    labels: Vec<miette::LabeledSpan>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Report {}

impl miette::Diagnostic for Report {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(&self.code))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().cloned()))
    }
}

/// Build the miette report for one diagnostic. Secondary labels in another
/// file than the primary one cannot be drawn in the same snippet: they are
/// appended to the help as `file:line:col`.
pub fn to_report(d: &Diagnostic, sources: &SourceMap) -> Report {
    let file = sources.get(d.span.file);
    let text = file.map(|f| Lines {
        text: f.text.clone(),
        starts: f.render_line_starts().clone(),
    });
    let text = text.unwrap_or_else(|| Lines {
        text: Arc::from(""),
        starts: Arc::from([0u32].as_slice()),
    });
    let name = sources.path(d.span.file).display().to_string();
    let mut labels = vec![miette::LabeledSpan::new_primary_with_span(
        (!d.label.is_empty()).then(|| d.label.clone()),
        (d.span.start as usize, d.span.len()),
    )];
    let mut help = d.help.clone();
    for l in &d.secondary {
        if l.span.file == d.span.file {
            labels.push(miette::LabeledSpan::new_with_span(
                Some(l.text.clone()),
                (l.span.start as usize, l.span.len()),
            ));
        } else {
            let (lc, _) = sources.line_col(l.span);
            let note = format!(
                "{}: {}:{}:{}",
                l.text,
                sources.path(l.span.file).display(),
                lc.line,
                lc.column
            );
            help = Some(match help {
                Some(h) => format!("{h}\nnote: {note}"),
                None => format!("note: {note}"),
            });
        }
    }
    Report {
        code: d.full_code(),
        severity: d.severity,
        message: d.message.clone(),
        help,
        source: miette::NamedSource::new(name, text),
        labels,
    }
}

/// A file's text as miette reads it. miette finds a span's line by scanning
/// the text from its start, which made rendering N diagnostics of one file
/// quadratic (and each report used to copy the whole text): this finds the
/// line by binary search and lets miette scan only from a line or so above
/// the lines it shows. The output is the same as with the whole text.
#[derive(Debug, Clone)]
struct Lines {
    text: Arc<str>,
    /// [`crate::config::source::SourceFile::render_line_starts`]: `starts[0]`
    /// is 0.
    starts: Arc<[u32]>,
}

impl miette::SourceCode for Lines {
    fn read_span<'a>(
        &'a self,
        span: &miette::SourceSpan,
        before: usize,
        after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        let line = self
            .starts
            .partition_point(|&s| s as usize <= span.offset())
            .saturating_sub(1);
        // One line more than miette keeps, so that the span never starts at
        // the window's first byte: miette treats an empty span at offset 0
        // differently from one at a later line start.
        let first = line.saturating_sub(before + 1);
        let base = self.starts.get(first).map_or(0, |&s| s as usize);
        let window = self.text.as_bytes().get(base..).unwrap_or_default();
        let shifted = miette::SourceSpan::new((span.offset() - base).into(), span.len());
        let c = miette::SourceCode::read_span(window, &shifted, before, after)?;
        Ok(Box::new(miette::MietteSpanContents::new(
            c.data(),
            miette::SourceSpan::new((c.span().offset() + base).into(), c.span().len()),
            c.line() + first,
            c.column(),
            c.line_count() + first,
        )))
    }
}

/// Render diagnostics as miette's graphical report.
pub fn render_human(
    diags: &[Diagnostic],
    sources: &SourceMap,
    color: bool,
    width: usize,
) -> String {
    let theme = if color {
        miette::GraphicalTheme::unicode()
    } else {
        miette::GraphicalTheme::unicode_nocolor()
    };
    let handler = miette::GraphicalReportHandler::new_themed(theme)
        .with_width(width)
        .with_links(false);
    let mut out = String::new();
    for d in diags {
        let report = to_report(d, sources);
        let _ = handler.render_report(&mut out, &report);
        out.push('\n');
    }
    out
}

/// "did you mean" against a list of known names (Jaro-Winkler, as cargo).
pub fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(f64, &str)> = None;
    for k in known {
        let score = strsim::jaro_winkler(name, k);
        if score > 0.8 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, k));
        }
    }
    best.map(|(_, k)| k)
}
