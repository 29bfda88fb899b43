//! Text → syntax tree: the pest grammar, its error productions turned into
//! diagnostics, and `include` expansion.
//!
//! Nothing here can panic or recurse without bound on any input: the nesting
//! depth is checked by a lexical pre-scan before pest sees the text, pest's
//! call limit is set, and files and includes are bounded in size and number.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pest::Parser as _;
use pest::iterators::Pair;

use crate::config::ast::{Arg, Block, Comment, Directive, End, File};
use crate::config::diagnostics::{Diagnostic, Diagnostics};
use crate::config::source::{FileId, SourceMap, Span};

#[derive(pest_derive::Parser)]
#[grammar = "grammar/gateway.pest"]
struct GatewayParser;

/// Deepest block nesting accepted (NGINX needs 3: http, server, location).
pub const MAX_DEPTH: usize = 16;
/// Largest config file read.
pub const MAX_FILE_SIZE: usize = 16 * 1024 * 1024;
/// Most files one config may pull in through `include`.
pub const MAX_FILES: usize = 1024;

/// Parse one file's text. Always returns a tree (possibly partial); problems
/// go to `diags`.
pub fn parse_text(file: FileId, text: &str, diags: &mut Diagnostics) -> File {
    if let Some(span) = too_deep(file, text) {
        diags.push(
            Diagnostic::error(
                "nesting_too_deep",
                span,
                format!("blocks are nested more than {MAX_DEPTH} deep"),
            )
            .label("this block is too deep")
            .help("gateway.conf needs at most `http { server { location { } } }`; close the blocks above"),
        );
        return File::default();
    }
    pest::set_call_limit(NonZeroUsize::new(text.len().saturating_mul(64) + 1_000_000));
    let pairs = match GatewayParser::parse(Rule::file, text) {
        Ok(p) => p,
        Err(e) => {
            let (start, end) = match e.location {
                pest::error::InputLocation::Pos(p) => (p, p),
                pest::error::InputLocation::Span((a, b)) => (a, b),
            };
            diags.push(
                Diagnostic::error("syntax_error", Span::new(file, start, end), "syntax error")
                    .label(e.variant.message().to_string())
                    .help("directives are `name arg... ;` or `name arg... { ... }`"),
            );
            return File::default();
        }
    };
    let mut w = Walker {
        file,
        text,
        diags,
        comments: Vec::new(),
    };
    let mut directives = Vec::new();
    for p in pairs {
        if p.as_rule() == Rule::file {
            w.items(p, &mut directives);
        }
    }
    File {
        directives,
        comments: w.comments,
    }
}

/// The first `{` deeper than [`MAX_DEPTH`], found without pest so that a
/// file of a million `{` cannot overflow the stack.
fn too_deep(file: FileId, text: &str) -> Option<Span> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    let mut word_start = true;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'#' if word_start => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' if word_start => {
                i += 1;
                while i < bytes.len() && bytes[i] != b {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                word_start = false;
                continue;
            }
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                // `${name}` inside a word: its braces are not blocks.
                let mut j = i + 2;
                while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                    j += 1;
                }
                if j > i + 2 && bytes.get(j) == Some(&b'}') {
                    i = j + 1;
                    word_start = false;
                    continue;
                }
                word_start = false;
            }
            b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(Span::new(file, i, i + 1));
                }
                word_start = true;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                word_start = true;
            }
            b';' | b' ' | b'\t' | b'\r' | b'\n' => word_start = true,
            _ => word_start = false,
        }
        i += 1;
    }
    None
}

struct Walker<'a> {
    file: FileId,
    text: &'a str,
    diags: &'a mut Diagnostics,
    comments: Vec<Comment>,
}

impl Walker<'_> {
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start(), s.end())
    }

    fn comment(&mut self, p: &Pair<Rule>) {
        self.comments.push(Comment {
            text: p.as_str().trim_end().to_string(),
            span: self.span(p),
        });
    }

    fn items(&mut self, parent: Pair<Rule>, out: &mut Vec<Directive>) {
        for p in parent.into_inner() {
            match p.as_rule() {
                Rule::directive => self.directive(p, out),
                Rule::COMMENT => self.comment(&p),
                Rule::stray_semi => {
                    let span = self.span(&p);
                    self.diags.push(
                        Diagnostic::error("stray_semicolon", span, "`;` without a directive")
                            .label("nothing to end here")
                            .help("remove this `;`"),
                    );
                }
                Rule::stray_close => {
                    let span = self.span(&p);
                    self.diags.push(
                        Diagnostic::error("unexpected_close", span, "`}` closes no block")
                            .label("no block is open here")
                            .help("remove this `}` or add the block it was meant to close"),
                    );
                }
                Rule::stray_block => {
                    let span = self.span(&p);
                    let open = Span::new(self.file, span.start as usize, span.start as usize + 1);
                    self.diags.push(
                        Diagnostic::error(
                            "block_without_name",
                            open,
                            "block `{` without a directive name",
                        )
                        .label("this block belongs to no directive")
                        .help("write the directive before the `{`, e.g. `server {`"),
                    );
                    // Walk it anyway so that what is inside is checked.
                    let mut ignored = Vec::new();
                    for q in p.into_inner() {
                        match q.as_rule() {
                            Rule::directive => self.directive(q, &mut ignored),
                            Rule::COMMENT => self.comment(&q),
                            Rule::unclosed => self.unclosed(open, "block"),
                            _ => {}
                        }
                    }
                }
                Rule::EOI | Rule::close | Rule::open | Rule::unclosed => {}
                _ => {}
            }
        }
    }

    fn unclosed(&mut self, open: Span, name: &str) {
        self.diags.push(
            Diagnostic::error(
                "unclosed_block",
                open,
                format!("`{name}` block is never closed"),
            )
            .label("this `{` has no matching `}`")
            .help("add `}` where the block ends"),
        );
    }

    fn arg(&mut self, p: Pair<Rule>) -> Arg {
        let span = self.span(&p);
        let raw = p.as_str().to_string();
        match p.as_rule() {
            Rule::quoted => {
                let qs = p.into_inner().next();
                let (quote, body, unterminated) = match qs {
                    Some(x) => {
                        let quote = if x.as_rule() == Rule::dquoted {
                            '"'
                        } else {
                            '\''
                        };
                        let mut body = "";
                        let mut unterminated = false;
                        for y in x.into_inner() {
                            match y.as_rule() {
                                Rule::dq_inner | Rule::sq_inner => body = y.as_str(),
                                Rule::unterminated => unterminated = true,
                                _ => {}
                            }
                        }
                        (quote, body, unterminated)
                    }
                    None => ('"', "", false),
                };
                if unterminated {
                    self.diags.push(
                        Diagnostic::error(
                            "unterminated_string",
                            span.sub(0, 1),
                            "quoted string is never closed",
                        )
                        .label("this quote opens a string that runs to the end of the file")
                        .help(format!("close the string with `{quote}`")),
                    );
                }
                let (value, literal_dollars) = unescape(body);
                Arg {
                    value,
                    literal_dollars,
                    raw,
                    quote: Some(quote),
                    span,
                }
            }
            _ => Arg {
                value: raw.clone(),
                literal_dollars: Vec::new(),
                raw,
                quote: None,
                span,
            },
        }
    }

    fn directive(&mut self, p: Pair<Rule>, out: &mut Vec<Directive>) {
        let span = self.span(&p);
        let mut head: Option<Arg> = None;
        let mut args = Vec::new();
        let mut block = None;
        let mut end = End::Missing;
        for q in p.into_inner() {
            match q.as_rule() {
                // The first is the name (`head`), the others its arguments.
                Rule::word | Rule::quoted => {
                    let a = self.arg(q);
                    if head.is_none() {
                        head = Some(a);
                    } else {
                        args.push(a);
                    }
                }
                Rule::COMMENT => self.comment(&q),
                Rule::semi => end = End::Semi,
                Rule::missing_semi => end = End::Missing,
                Rule::block => {
                    end = End::Block;
                    let mut open = span;
                    let mut close = None;
                    let mut children = Vec::new();
                    let mut is_unclosed = false;
                    for r in q.clone().into_inner() {
                        match r.as_rule() {
                            Rule::open => open = self.span(&r),
                            Rule::close => close = Some(self.span(&r)),
                            Rule::unclosed => is_unclosed = true,
                            _ => {}
                        }
                    }
                    self.items(q, &mut children);
                    if is_unclosed {
                        let name = head.as_ref().map(|h| h.value.clone()).unwrap_or_default();
                        self.unclosed(open, &name);
                    }
                    block = Some(Block {
                        directives: children,
                        open,
                        close,
                    });
                }
                _ => {}
            }
        }
        let Some(head) = head else { return };
        let mut d = Directive {
            name: head.value,
            name_span: head.span,
            args,
            block,
            span,
            end,
            included_from: None,
        };
        // A directive name at the start of a later line, at the directive's
        // own indentation, is almost surely the next directive: the `;`
        // before it is missing. Split there and say so.
        while let Some(i) = self.split_point(&d) {
            let rest = d.args.split_off(i);
            let last = d.args.last().map(|a| a.span).unwrap_or(d.name_span);
            self.missing_semi(&d, last);
            let mut rest = rest.into_iter();
            let Some(new_head) = rest.next() else { break };
            let next = Directive {
                name: new_head.value,
                name_span: new_head.span,
                args: rest.collect(),
                block: d.block.take(),
                span: Span {
                    start: new_head.span.start,
                    ..d.span
                },
                end: d.end,
                included_from: None,
            };
            d.span.end = last.end;
            d.end = End::Missing;
            out.push(d);
            d = next;
        }
        if d.end == End::Missing {
            let last = d.args.last().map(|a| a.span).unwrap_or(d.name_span);
            self.missing_semi(&d, last);
            d.span.end = last.end;
        }
        out.push(d);
    }

    fn missing_semi(&mut self, d: &Directive, last: Span) {
        self.diags.push(
            Diagnostic::error(
                "missing_semicolon",
                last,
                format!("missing `;` after `{}`", d.name),
            )
            .label("expected `;` after this")
            .secondary(d.name_span, "in this directive")
            .help(format!("end the `{}` directive with `;`", d.name)),
        );
    }

    fn split_point(&self, d: &Directive) -> Option<usize> {
        // Computed only for a candidate: `column` scans back to the start of
        // the line, and doing that for every directive of a long line (a
        // minified file) is quadratic.
        let mut name_col = None;
        for i in 0..d.args.len() {
            let a = &d.args[i];
            if a.quote.is_some() || !crate::config::schema::is_known_directive(&a.value) {
                continue;
            }
            let prev_end = if i == 0 {
                d.name_span.end
            } else {
                d.args[i - 1].span.end
            };
            let between = self
                .text
                .get(prev_end as usize..a.span.start as usize)
                .unwrap_or("");
            if between.contains('\n')
                && self.column(a.span.start)
                    == *name_col.get_or_insert_with(|| self.column(d.name_span.start))
            {
                return Some(i);
            }
        }
        None
    }

    fn column(&self, offset: u32) -> usize {
        let before = &self.text.as_bytes()[..offset as usize];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        offset as usize - line_start
    }
}

/// Resolve the escapes of a quoted string (LANGUAGE.md §1, §13.1): `\"`,
/// `\'`, `\\`, `\n`, `\t`, `\$` (a literal dollar, whose offset is returned
/// so variable parsing can skip it); any other backslash is kept as written.
pub fn unescape(body: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(body.len());
    let mut dollars = Vec::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('$') => {
                dollars.push(out.len());
                out.push('$');
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    (out, dollars)
}

/// A whole config: every file read, and the directive tree with includes
/// expanded.
#[derive(Debug)]
pub struct Loaded {
    pub sources: SourceMap,
    pub directives: Vec<Directive>,
    /// Every file that went into the config (for the reload watcher).
    pub files: Vec<PathBuf>,
}

/// Read `path` and everything it includes. I/O problems with the top file
/// are returned as `Err`; everything else becomes a diagnostic.
pub fn load(path: &Path, diags: &mut Diagnostics) -> Result<Loaded, std::io::Error> {
    let bytes = read_bounded(path)?;
    Ok(load_bytes(path, &bytes, diags))
}

/// Read a config file, refusing what is not a regular file and reading at
/// most one byte more than [`MAX_FILE_SIZE`], so that `include /dev/zero;`
/// or a FIFO neither exhausts memory nor blocks (the size check in
/// [`Loader::file`] then reports the file as too large).
fn read_bounded(path: &Path) -> Result<Vec<u8>, std::io::Error> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Parse `bytes` as the config file `path` (includes are read from disk).
pub fn load_bytes(path: &Path, bytes: &[u8], diags: &mut Diagnostics) -> Loaded {
    let mut l = Loader {
        sources: SourceMap::new(),
        files: Vec::new(),
        stack: Vec::new(),
    };
    let directives = l.file(path.to_path_buf(), bytes, None, 0, diags);
    Loaded {
        sources: l.sources,
        directives,
        files: l.files,
    }
}

struct Loader {
    sources: SourceMap,
    files: Vec<PathBuf>,
    /// Canonical paths of the files being included, outermost first.
    stack: Vec<(PathBuf, PathBuf)>,
}

impl Loader {
    fn file(
        &mut self,
        path: PathBuf,
        bytes: &[u8],
        from: Option<Span>,
        depth: usize,
        diags: &mut Diagnostics,
    ) -> Vec<Directive> {
        if bytes.len() > MAX_FILE_SIZE {
            let id = self.sources.add(path.clone(), Arc::from(""));
            self.files.push(path);
            diags.push(
                Diagnostic::error(
                    "file_too_large",
                    Span::new(id, 0, 0),
                    "config file is too large",
                )
                .label(format!("over {} MiB", MAX_FILE_SIZE / (1024 * 1024)))
                .help("split the config with `include`"),
            );
            return Vec::new();
        }
        let (text, bad_utf8) = match std::str::from_utf8(bytes) {
            Ok(t) => (t.to_string(), None),
            Err(e) => (
                String::from_utf8_lossy(bytes).into_owned(),
                Some(e.valid_up_to()),
            ),
        };
        let text: Arc<str> = Arc::from(text);
        let id = self.sources.add(path.clone(), text.clone());
        self.files.push(path.clone());
        if let Some(valid) = bad_utf8 {
            diags.push(
                Diagnostic::error(
                    "invalid_utf8",
                    Span::new(id, valid, valid + 1),
                    "config file is not valid UTF-8",
                )
                .label("the first invalid byte is here")
                .help("save the file as UTF-8"),
            );
            return Vec::new();
        }
        let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        self.stack.push((canonical, path.clone()));
        let parsed = parse_text(id, &text, diags);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let out = self.expand(parsed.directives, &dir, from, depth, diags);
        self.stack.pop();
        out
    }

    fn expand(
        &mut self,
        directives: Vec<Directive>,
        dir: &Path,
        from: Option<Span>,
        depth: usize,
        diags: &mut Diagnostics,
    ) -> Vec<Directive> {
        let mut out = Vec::with_capacity(directives.len());
        for mut d in directives {
            if d.included_from.is_none() {
                d.included_from = from;
            }
            if d.name == "include" && d.block.is_none() {
                self.include(&d, dir, depth, &mut out, diags);
                continue;
            }
            if let Some(block) = d.block.take() {
                // `parse_text` bounds the nesting of one file; a file
                // included inside blocks adds its own, so the whole tree is
                // bounded here, before anything walks it recursively.
                let children = if depth >= MAX_DEPTH {
                    diags.push(
                        Diagnostic::error(
                            "nesting_too_deep",
                            block.open,
                            format!("blocks are nested more than {MAX_DEPTH} deep"),
                        )
                        .label("this block is too deep, counting the blocks around the `include` that brought it in")
                        .help("gateway.conf needs at most `http { server { location { } } }`; include this file at a shallower level"),
                    );
                    Vec::new()
                } else {
                    self.expand(block.directives, dir, from, depth + 1, diags)
                };
                d.block = Some(Block {
                    directives: children,
                    ..block
                });
            }
            out.push(d);
        }
        out
    }

    fn include(
        &mut self,
        d: &Directive,
        dir: &Path,
        depth: usize,
        out: &mut Vec<Directive>,
        diags: &mut Diagnostics,
    ) {
        if d.args.len() != 1 {
            diags.push(
                Diagnostic::error(
                    "wrong_argument_count",
                    d.args_span(),
                    "`include` takes exactly one argument",
                )
                .label(format!("{} arguments given", d.args.len()))
                .help("write `include FILE_OR_GLOB;`"),
            );
            return;
        }
        let arg = &d.args[0];
        let pattern = arg.text();
        let full = if Path::new(&pattern).is_absolute() {
            PathBuf::from(&pattern)
        } else {
            dir.join(&pattern)
        };
        let is_glob = pattern.contains(['*', '?', '[']);
        let mut paths: Vec<PathBuf> = if is_glob {
            match glob::glob(&full.to_string_lossy()) {
                Ok(iter) => iter
                    .filter_map(Result::ok)
                    .filter(|p| p.is_file())
                    .collect(),
                Err(e) => {
                    diags.push(
                        Diagnostic::error(
                            "invalid_glob",
                            arg.span,
                            format!("invalid include pattern `{pattern}`"),
                        )
                        .label(e.msg.to_string())
                        .help("use `*`, `?` and `[...]` as in a shell glob"),
                    );
                    return;
                }
            }
        } else {
            vec![full]
        };
        paths.sort();
        for p in paths {
            if self.files.len() >= MAX_FILES {
                diags.push(
                    Diagnostic::error("too_many_files", arg.span, "too many included files")
                        .label(format!("more than {MAX_FILES} files"))
                        .help("include fewer files"),
                );
                return;
            }
            let canonical = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if let Some(pos) = self.stack.iter().position(|(c, _)| *c == canonical) {
                let mut chain: Vec<String> = self.stack[pos..]
                    .iter()
                    .map(|(_, shown)| shown.display().to_string())
                    .collect();
                chain.push(p.display().to_string());
                diags.push(
                    Diagnostic::error(
                        "include_cycle",
                        arg.span,
                        format!("`include` of `{}` forms a cycle", p.display()),
                    )
                    .label("this include leads back to a file being included")
                    .help(format!("break the chain: {}", chain.join(" → "))),
                );
                continue;
            }
            match read_bounded(&p) {
                Ok(bytes) => {
                    let children = self.file(p, &bytes, Some(d.span), depth, diags);
                    out.extend(children);
                }
                Err(e) => {
                    diags.push(
                        Diagnostic::error(
                            "unreadable_include",
                            arg.span,
                            format!("cannot read included file `{}`", p.display()),
                        )
                        .label(e.to_string())
                        .help(
                            "check the path; it is relative to the directory of the including file",
                        ),
                    );
                }
            }
        }
    }
}
