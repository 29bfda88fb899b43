//! `tollgate fmt`'s engine: fixed cases for each layout rule, a property test
//! over generated files (idempotent, and the same directives, arguments and
//! comments after formatting), and every `examples/*.conf`.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tollgate::config::ast::Directive;
use tollgate::config::diagnostics::Diagnostics;
use tollgate::config::format::{format_source, is_formatted};
use tollgate::config::parse::parse_text;
use tollgate::config::source::FileId;

/// Format, insisting that it succeeds and is idempotent.
fn fmt(text: &str) -> String {
    let once = match format_source(text) {
        Ok(s) => s,
        Err(d) => panic!("format_source refused {text:?}: {d:?}"),
    };
    let twice =
        format_source(&once).unwrap_or_else(|d| panic!("output does not parse: {once:?}: {d:?}"));
    assert_eq!(once, twice, "not idempotent for {text:?}");
    once
}

fn error_codes(text: &str) -> Vec<&'static str> {
    match format_source(text) {
        Ok(s) => panic!("formatted a broken file: {s:?}"),
        Err(d) => d.iter().map(|x| x.code).collect(),
    }
}

// ---- layout -------------------------------------------------------------

#[test]
fn indents_nested_blocks_four_spaces_one_directive_per_line() {
    let input = "http{server {listen   80;\tserver_name a.example  b.example; location /api/ { proxy_pass http://up; }}}";
    let want = "\
http {
    server {
        listen 80;
        server_name a.example b.example;
        location /api/ {
            proxy_pass http://up;
        }
    }
}
";
    assert_eq!(fmt(input), want);
}

#[test]
fn splits_and_joins_lines() {
    let input = "a 1;b 2;\nserver\n{\n  listen\n    80\n   ;\n}\n";
    let want = "a 1;\nb 2;\nserver {\n    listen 80;\n}\n";
    assert_eq!(fmt(input), want);
}

#[test]
fn empty_block_and_empty_file() {
    assert_eq!(fmt("events {}"), "events {\n}\n");
    assert_eq!(fmt("events {\n\n\n}\n"), "events {\n}\n");
    assert_eq!(fmt(""), "");
    assert_eq!(fmt("  \n\n\t\r\n"), "");
}

#[test]
fn exactly_one_final_newline() {
    assert_eq!(fmt("a;"), "a;\n");
    assert_eq!(fmt("a;\n\n\n\n"), "a;\n");
    assert_eq!(fmt("# only a comment"), "# only a comment\n");
}

// ---- comments -----------------------------------------------------------

#[test]
fn own_line_comments_take_the_indentation_of_their_level() {
    let input = "\
# top
server {
# about listen
        listen 80;
            # before the close
}
# at the end
";
    let want = "\
# top
server {
    # about listen
    listen 80;
    # before the close
}
# at the end
";
    assert_eq!(fmt(input), want);
}

#[test]
fn trailing_comments_stay_trailing_one_space_away() {
    let input = "server {   # the server\n listen 80;# port\n location / {\n }\t\t# empty\n}    # done   \n";
    let want = "\
server { # the server
    listen 80; # port
    location / {
    } # empty
} # done
";
    assert_eq!(fmt(input), want);
}

#[test]
fn comments_among_arguments_move_above_the_directive() {
    let input = "\
server {
    listen 80;
    proxy_pass # where to
        http://up # really
        ;
    location # which
    /x {
        return 200;
    }
}
";
    let want = "\
server {
    listen 80;
    # where to
    # really
    proxy_pass http://up;
    # which
    location /x {
        return 200;
    }
}
";
    assert_eq!(fmt(input), want);
}

#[test]
fn moved_comments_keep_the_blank_line_above_the_directive() {
    let input = "a;\n\nb # c\n  x;\n";
    assert_eq!(fmt(input), "a;\n\n# c\nb x;\n");
}

#[test]
fn comment_text_is_kept_as_written() {
    let input = "a; #  two  spaces, \"quotes\", { braces }; ## and é\n";
    assert_eq!(
        fmt(input),
        "a; #  two  spaces, \"quotes\", { braces }; ## and é\n"
    );
}

#[test]
fn hash_inside_words_and_quotes_is_not_a_comment() {
    let input = "return 200 a#b \"#not\" '#no';\n";
    assert_eq!(fmt(input), input);
}

// ---- blank lines --------------------------------------------------------

#[test]
fn blank_lines_collapse_to_one_and_vanish_inside_braces() {
    let input = "\n\n\na;\n\n\n\nb;\nc;\nserver {\n\n\n    listen 80;\n\n\n\n    # note\n\n    root /x;\n\n\n}\n\n\n# end\n\n";
    let want = "\
a;

b;
c;
server {
    listen 80;

    # note

    root /x;
}

# end
";
    assert_eq!(fmt(input), want);
}

#[test]
fn no_blank_line_after_a_trailing_comment_on_the_brace() {
    let input = "server { # main\n\n\n    listen 80;\n}\n";
    assert_eq!(fmt(input), "server { # main\n    listen 80;\n}\n");
}

// ---- arguments ----------------------------------------------------------

#[test]
fn quoted_arguments_and_escapes_are_preserved() {
    let input = concat!(
        "location ~ \"^/a{2}/(\\d+)\\.json$\" {\n",
        "    return 200 'it\\'s \"fine\"\\n' \"\\$literal ${host}\";\n",
        "    set $x ${host}suffix;\n",
        "}\n",
    );
    assert_eq!(fmt(input), input);
}

#[test]
fn multi_line_quoted_strings_are_kept_verbatim() {
    let input = "server {\nreturn 200 \"line one\n   line two\";\n}\n";
    let want = "server {\n    return 200 \"line one\n   line two\";\n}\n";
    assert_eq!(fmt(input), want);
}

#[test]
fn quoted_directive_name_is_kept_as_written() {
    assert_eq!(fmt("\"listen\"   80;"), "\"listen\" 80;\n");
}

#[test]
fn adjacent_tokens_get_single_spaces() {
    assert_eq!(fmt("return 200\"a\"'b'x;"), "return 200\"a\"'b'x;\n");
    assert_eq!(fmt("return \"a\"'b'x;"), "return \"a\" 'b' x;\n");
}

// ---- line ends ----------------------------------------------------------

#[test]
fn crlf_input_gives_lf_output() {
    let input = "# head\r\nserver {\r\n\r\n\r\n  listen 80; # port\r\n\r\n\r\n  root /x;\r\n}\r\n";
    let want = "# head\nserver {\n    listen 80; # port\n\n    root /x;\n}\n";
    assert_eq!(fmt(input), want);
}

#[test]
fn lone_cr_is_a_line_end() {
    assert_eq!(fmt("a; # one\rb;\r\r\rc;"), "a; # one\nb;\n\nc;\n");
}

#[test]
fn byte_order_mark_is_dropped() {
    assert_eq!(fmt("\u{FEFF}a 1;\n"), "a 1;\n");
}

// ---- refusals and helpers ----------------------------------------------

#[test]
fn syntax_errors_are_returned_not_formatted() {
    assert_eq!(
        error_codes("server {\n    listen 80\n}\n"),
        vec!["missing_semicolon"]
    );
    assert_eq!(error_codes("server {\n"), vec!["unclosed_block"]);
    assert_eq!(error_codes("a;\n}\n"), vec!["unexpected_close"]);
    assert!(error_codes("return 200 \"open").contains(&"unterminated_string"));
    assert_eq!(error_codes("a;;"), vec!["stray_semicolon"]);
}

#[test]
fn is_formatted_says_whether_fmt_would_change_anything() {
    assert_eq!(is_formatted("a 1;\n").ok(), Some(true));
    assert_eq!(is_formatted("").ok(), Some(true));
    assert_eq!(is_formatted("a  1;\n").ok(), Some(false));
    assert_eq!(is_formatted("a 1;").ok(), Some(false));
    assert_eq!(is_formatted("a 1;\r\n").ok(), Some(false));
    assert!(is_formatted("a {").is_err());
}

// ---- structure is kept ----------------------------------------------------

/// A directive without spans: what formatting must not change.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    name: String,
    args: Vec<String>,
    block: Option<Vec<Shape>>,
}

fn shapes(ds: &[Directive]) -> Vec<Shape> {
    ds.iter()
        .map(|d| Shape {
            name: d.name.clone(),
            args: d.args.iter().map(|a| a.value.clone()).collect(),
            block: d.block.as_ref().map(|b| shapes(&b.directives)),
        })
        .collect()
}

/// The directives and the comment texts, in order, or the diagnostics.
fn structure(text: &str) -> Result<(Vec<Shape>, Vec<String>), Diagnostics> {
    let mut diags = Diagnostics::new();
    let f = parse_text(FileId(0), text, &mut diags);
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok((
        shapes(&f.directives),
        f.comments.into_iter().map(|c| c.text).collect(),
    ))
}

/// `fmt` changes only the layout: same directives, arguments, nesting and
/// comments; and it is idempotent.
fn check_preserves(text: &str) -> Result<(), TestCaseError> {
    let before = structure(text)
        .map_err(|d| TestCaseError::fail(format!("input has diagnostics: {d:?}")))?;
    let once = format_source(text).map_err(|d| TestCaseError::fail(format!("refused: {d:?}")))?;
    let after = structure(&once)
        .map_err(|d| TestCaseError::fail(format!("output has diagnostics: {d:?}\n{once}")))?;
    prop_assert_eq!(&before, &after, "structure changed:\n{}", once);
    let twice =
        format_source(&once).map_err(|d| TestCaseError::fail(format!("refused output: {d:?}")))?;
    prop_assert_eq!(&once, &twice, "not idempotent");
    prop_assert!(once.is_empty() || (once.ends_with('\n') && !once.ends_with("\n\n")));
    prop_assert!(!once.starts_with('\n'));
    Ok(())
}

#[test]
fn every_example_formats_without_changing_structure() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // no examples yet
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    paths.sort();
    for path in paths {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(e) = check_preserves(&text) {
            panic!("{}: {e}", path.display());
        }
    }
}

// ---- generated files ------------------------------------------------------

/// One token of a generated file; the generator decides the blanks between.
#[derive(Debug, Clone)]
enum Tok {
    Word(String),
    Quoted(String),
    Semi,
    Open,
    Close,
    Comment(String),
}

#[derive(Debug, Clone)]
enum Item {
    Comment(String),
    Directive {
        name: Tok,
        /// Arguments, with the odd comment among them.
        args: Vec<Tok>,
        block: Option<Vec<Item>>,
    },
}

fn name() -> impl Strategy<Value = Tok> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "listen", "server", "location", "proxy_pass", "return", "root", "upstream", "http",
            "set", "x_1", "_",
        ])
        .prop_map(|s| Tok::Word(s.to_string())),
        1 => Just(Tok::Quoted("\"quoted name\"".to_string())),
    ]
}

fn bare_word() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "80",
            "/api/",
            "$host",
            "${host}x",
            "http://u:8080/p",
            "a#b",
            "x\"y",
            "~",
            "=",
            "^/a$",
            "10m",
            "on",
            "off",
            "$",
            "a$",
            "100r/s",
            "*.example.com",
            "é",
        ])
        .prop_map(str::to_string),
        // Never exactly a directive name, so the parser's "missing `;`"
        // heuristic (a directive name starting a later line) stays quiet.
        "[a-z0-9_./:$~^=*-][a-z0-9_./:$~^=*#\"'-]{0,5}[0-9/]",
    ]
}

fn quoted() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "a", "Z", " ", "{", "}", ";", "#", "$", "${x}", "\t", "\n", "\r\n", "é", "\\\"", "\\'",
        "\\\\", "\\n", "\\t", "\\$", "\\d", "\\.", "OTHER",
    ]);
    (any::<bool>(), prop::collection::vec(piece, 0..6)).prop_map(|(double, pieces)| {
        let (q, other) = if double { ('"', "'") } else { ('\'', "\"") };
        let mut s = String::new();
        s.push(q);
        for p in pieces {
            s.push_str(if p == "OTHER" { other } else { p });
        }
        s.push(q);
        s
    })
}

fn comment() -> impl Strategy<Value = String> {
    prop_oneof![
        "#[ -~]{0,12}",
        Just("#".to_string()),
        Just("# é ünïcode  ".to_string()),
    ]
}

fn arg() -> impl Strategy<Value = Tok> {
    prop_oneof![
        6 => bare_word().prop_map(Tok::Word),
        3 => quoted().prop_map(Tok::Quoted),
        1 => comment().prop_map(Tok::Comment),
    ]
}

fn items() -> impl Strategy<Value = Vec<Item>> {
    let leaf = prop_oneof![
        3 => (name(), prop::collection::vec(arg(), 0..4))
            .prop_map(|(name, args)| Item::Directive { name, args, block: None }),
        1 => comment().prop_map(Item::Comment),
    ];
    let item = leaf.prop_recursive(3, 40, 5, |inner| {
        prop_oneof![
            (
                name(),
                prop::collection::vec(arg(), 0..3),
                prop::collection::vec(inner.clone(), 0..5)
            )
                .prop_map(|(name, args, block)| Item::Directive {
                    name,
                    args,
                    block: Some(block)
                }),
            inner,
        ]
    });
    prop::collection::vec(item, 0..7)
}

fn flatten(items: &[Item], out: &mut Vec<Tok>) {
    for it in items {
        match it {
            Item::Comment(c) => out.push(Tok::Comment(c.clone())),
            Item::Directive { name, args, block } => {
                out.push(name.clone());
                out.extend(args.iter().cloned());
                match block {
                    None => out.push(Tok::Semi),
                    Some(b) => {
                        out.push(Tok::Open);
                        flatten(b, out);
                        out.push(Tok::Close);
                    }
                }
            }
        }
    }
}

const BLANKS: &[&str] = &[
    "",
    " ",
    "  ",
    "\t",
    " \t ",
    "\n",
    "\r\n",
    "\n\n",
    "\r\n\r\n",
    "\n\n\n\n",
    "  \n\t",
    "\n    ",
    "\r",
    " \u{FEFF}",
];

/// Lay the tokens out with blanks picked by `seeds`, keeping apart what
/// must stay apart: a word from what follows it, a comment from the next
/// line.
fn render(toks: &[Tok], seeds: &[u8]) -> String {
    let mut s = String::new();
    let mut prev: Option<&Tok> = None;
    for (i, t) in toks.iter().chain(std::iter::once(&Tok::Semi)).enumerate() {
        let last = i == toks.len();
        let seed = seeds.get(i % seeds.len().max(1)).copied().unwrap_or(0) as usize;
        let needs_break = matches!(prev, Some(Tok::Comment(_)));
        let needs_space = match prev {
            Some(Tok::Word(w)) => {
                matches!(t, Tok::Word(_) | Tok::Quoted(_) | Tok::Comment(_))
                    || (w.ends_with('$') && matches!(t, Tok::Open))
            }
            _ => false,
        };
        let ok: Vec<&str> = BLANKS
            .iter()
            .copied()
            .filter(|b| !needs_break || b.contains(['\n', '\r']))
            .filter(|b| !needs_space || !b.is_empty())
            .collect();
        s.push_str(ok[seed % ok.len()]);
        if last {
            break;
        }
        match t {
            Tok::Word(w) | Tok::Quoted(w) | Tok::Comment(w) => s.push_str(w),
            Tok::Semi => s.push(';'),
            Tok::Open => s.push('{'),
            Tok::Close => s.push('}'),
        }
        prev = Some(t);
    }
    s
}

fn file_text() -> impl Strategy<Value = String> {
    (items(), prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(items, seeds)| {
        let mut toks = Vec::new();
        flatten(&items, &mut toks);
        render(&toks, &seeds)
    })
}

proptest! {
    // Regressions go to `tests/fmt.proptest-regressions`: the default looks
    // for `src/lib.rs` next to the test file and warns on every run.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fmt_is_idempotent_and_keeps_structure(text in file_text()) {
        check_preserves(&text)?;
    }
}
