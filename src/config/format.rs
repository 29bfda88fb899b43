//! `tollgate fmt`: canonical layout (LANGUAGE.md §11, §13.13).
//!
//! Works on the syntax tree straight from [`parse_text`], not on the
//! validated model: a file with an unknown directive or a bad duration still
//! has a layout worth fixing, while a file with a syntax error does not have
//! one structure we could be sure of, so it is refused with its diagnostics.
//!
//! The layout:
//!
//! - one directive per line, indented four spaces per block level,
//!   `name arg arg;` and `name arg {` with single spaces, `}` on its own line
//!   (an empty block is `name {` followed by `}` on the next line, so that
//!   every block looks the same and a comment can be added inside it);
//! - names and arguments exactly as written ([`Arg::raw`]): quoting and
//!   escapes are the author's, and a quoted string spanning lines keeps its
//!   lines (and any `\r` in them) untouched, because that is its value;
//! - a comment on its own line stays on its own line, at the indentation of
//!   the items around it; a comment after a directive's `;`, `{` or `}` stays
//!   after it, one space away; a comment among a directive's arguments moves
//!   to its own line just before that directive;
//! - at most one blank line between items, none just inside `{` or `}` nor at
//!   the start of the file; LF line ends; exactly one final newline (an empty
//!   file stays empty). Blanks are spaces, tabs, line ends and byte-order
//!   marks, so a byte-order mark is dropped.
//!
//! Formatting changes layout only: the output parses to the same directives,
//! argument values, nesting and comments (in the same order), and formats to
//! itself. `tests/fmt.rs` checks both on generated files.

use crate::config::ast::{Arg, Comment, Directive, File};
use crate::config::diagnostics::Diagnostics;
use crate::config::parse::parse_text;
use crate::config::source::FileId;

/// One level of block indentation.
pub const INDENT: &str = "    ";

/// Format a whole file's text.
///
/// The text is parsed as [`FileId`]`(0)`; if the parser reports anything, the
/// file is not formatted and those diagnostics are returned (their spans
/// refer to `FileId(0)`, so a caller rendering them adds the text to a fresh
/// [`SourceMap`](crate::config::source::SourceMap) first).
pub fn format_source(text: &str) -> Result<String, Diagnostics> {
    let mut diags = Diagnostics::new();
    let file = parse_text(FileId(0), text, &mut diags);
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok(print(text, &file))
}

/// Whether `text` is already in canonical layout (what `fmt --check` asks).
/// Fails like [`format_source`] on a file with syntax errors.
pub fn is_formatted(text: &str) -> Result<bool, Diagnostics> {
    format_source(text).map(|formatted| formatted == text)
}

/// Print a tree parsed from `text` without diagnostics.
fn print(text: &str, file: &File) -> String {
    let mut comments = file.comments.clone();
    // The walker collects comments as it meets them, which is document order
    // today; sorting keeps the printer right should that ever change.
    comments.sort_by_key(|c| c.span.start);
    let mut p = Printer {
        text,
        comments: &comments,
        next: 0,
        out: String::with_capacity(text.len() + text.len() / 8),
    };
    p.sequence(&file.directives, 0, None, u32::MAX);
    p.out
}

struct Printer<'a> {
    text: &'a str,
    /// Every comment of the file, in document order.
    comments: &'a [Comment],
    /// The first comment not printed yet.
    next: usize,
    out: String,
}

/// Where a sequence of items (the file, or one block's inside) stands while
/// it is printed.
struct Cursor {
    /// Source offset where the last item printed on the current output line
    /// ended (the `{` of the block at first); `None` at the start of the file.
    prev: Option<u32>,
    /// Nothing but a trailing comment on the `{` printed yet: no blank line
    /// may come next.
    first: bool,
}

impl<'a> Printer<'a> {
    /// Print `directives` and the comments among them, up to the source
    /// offset `limit` (the block's `}`, or the end of the file).
    fn sequence(
        &mut self,
        directives: &[Directive],
        depth: usize,
        open_end: Option<u32>,
        limit: u32,
    ) {
        let mut cur = Cursor {
            prev: open_end,
            first: true,
        };
        for d in directives {
            self.comments_before(d.span.start, depth, &mut cur);
            // Comments among the arguments go on their own lines above the
            // directive; the blank line, if any, goes above them so that
            // they stay attached to the directive they were written in.
            self.blank_line(&cur, d.span.start);
            let head_end = d.block.as_ref().map_or(d.span.end, |b| b.open.start);
            while let Some(c) = self.comment_before(head_end) {
                self.own_line(depth, &c.text);
            }
            cur.first = false;
            self.directive(d, depth);
            let end = d
                .block
                .as_ref()
                .and_then(|b| b.close)
                .map_or(d.span.end, |c| c.end);
            cur.prev = Some(end);
        }
        self.comments_before(limit, depth, &mut cur);
    }

    /// Print the comments that start before `limit`, each either after the
    /// previous item (when no line end separates them) or on its own line.
    fn comments_before(&mut self, limit: u32, depth: usize, cur: &mut Cursor) {
        while let Some(c) = self.comment_before(limit) {
            let trailing = cur
                .prev
                .is_some_and(|p| line_breaks(self.gap(p, c.span.start)) == 0);
            if trailing && self.out.ends_with('\n') {
                self.out.pop();
                self.out.push(' ');
                self.out.push_str(&c.text);
                self.out.push('\n');
            } else {
                self.blank_line(cur, c.span.start);
                self.own_line(depth, &c.text);
                cur.first = false;
            }
            cur.prev = Some(c.span.end);
        }
    }

    /// The next comment, if it starts before `limit`; it counts as printed.
    fn comment_before(&mut self, limit: u32) -> Option<&'a Comment> {
        let comments = self.comments;
        let c = comments.get(self.next).filter(|c| c.span.start < limit)?;
        self.next += 1;
        Some(c)
    }

    /// One blank line before an item starting at `start` when the source has
    /// at least one there, and the item is not the first of its sequence.
    fn blank_line(&mut self, cur: &Cursor, start: u32) {
        if cur.first {
            return;
        }
        if let Some(p) = cur.prev
            && line_breaks(self.gap(p, start)) >= 2
        {
            self.out.push('\n');
        }
    }

    fn directive(&mut self, d: &Directive, depth: usize) {
        self.indent(depth);
        // The name as written: it may be quoted, and `Directive::name` is
        // unescaped.
        let name = self.gap(d.name_span.start, d.name_span.end);
        self.out.push_str(name);
        for a in &d.args {
            self.arg(a);
        }
        match &d.block {
            None => self.out.push_str(";\n"),
            Some(b) => {
                self.out.push_str(" {\n");
                let limit = b.close.map_or(u32::MAX, |c| c.start);
                self.sequence(&b.directives, depth + 1, Some(b.open.end), limit);
                self.indent(depth);
                self.out.push_str("}\n");
            }
        }
    }

    fn arg(&mut self, a: &Arg) {
        self.out.push(' ');
        self.out.push_str(&a.raw);
    }

    fn own_line(&mut self, depth: usize, text: &str) {
        self.indent(depth);
        self.out.push_str(text);
        self.out.push('\n');
    }

    fn indent(&mut self, depth: usize) {
        for _ in 0..depth {
            self.out.push_str(INDENT);
        }
    }

    /// The source between two offsets (empty if they are not a valid range,
    /// which a tree parsed from this text never produces).
    fn gap(&self, from: u32, to: u32) -> &'a str {
        self.text.get(from as usize..to as usize).unwrap_or("")
    }
}

/// Line ends in `s`, counted as the grammar does for comments: `\n`, `\r\n`
/// and a lone `\r` are one each.
fn line_breaks(s: &str) -> usize {
    let b = s.as_bytes();
    b.iter()
        .enumerate()
        .filter(|&(i, &c)| c == b'\n' || (c == b'\r' && b.get(i + 1) != Some(&b'\n')))
        .count()
}
