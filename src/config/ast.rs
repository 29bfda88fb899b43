//! The syntax tree: what the file says, as written, with a span on every node.
//!
//! Produced by [`crate::config::parse`], consumed by the validator (which
//! turns it into typed settings) and by `tollgate fmt` (which prints it back).
//! Nothing here knows what a directive means.

use crate::config::source::Span;

/// One `name arg... ;` or `name arg... { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// The directive name as written (unescaped when quoted).
    pub name: String,
    pub name_span: Span,
    pub args: Vec<Arg>,
    /// `Some` for a block directive (`server { ... }`).
    pub block: Option<Block>,
    /// From the first character of the name to the `;` or `}` (inclusive).
    pub span: Span,
    /// How the directive ended.
    pub end: End,
    /// Set when this directive came from an `include`: the span of the
    /// `include` directive that brought it in (the innermost one).
    pub included_from: Option<Span>,
}

/// How a directive was terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `;`
    Semi,
    /// `{ ... }`
    Block,
    /// Neither: the file or the enclosing block ended first, or the next
    /// directive began on a new line. Already reported as a diagnostic.
    Missing,
}

/// The `{ ... }` of a block directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub directives: Vec<Directive>,
    pub open: Span,
    /// `None` when the file ended before the block was closed.
    pub close: Option<Span>,
}

/// One argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// The argument with quotes removed and escapes resolved.
    pub value: String,
    /// Byte offsets in `value` of dollars written `\$` (literal, never a
    /// variable).
    pub literal_dollars: Vec<usize>,
    /// The source text, quotes included.
    pub raw: String,
    pub quote: Option<char>,
    pub span: Span,
}

impl Arg {
    /// The argument as plain text, escapes resolved.
    pub fn text(&self) -> String {
        self.value.clone()
    }
}

/// A `#` comment, kept for `tollgate fmt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comment {
    pub text: String,
    pub span: Span,
}

/// One parsed file, before includes are expanded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct File {
    pub directives: Vec<Directive>,
    pub comments: Vec<Comment>,
}

impl Directive {
    /// The directives of the block, or an empty slice.
    pub fn children(&self) -> &[Directive] {
        self.block
            .as_ref()
            .map(|b| b.directives.as_slice())
            .unwrap_or(&[])
    }

    /// The span of the arguments (or of the name when there are none).
    pub fn args_span(&self) -> Span {
        match (self.args.first(), self.args.last()) {
            (Some(a), Some(b)) => a.span.to(b.span),
            _ => self.name_span,
        }
    }
}
