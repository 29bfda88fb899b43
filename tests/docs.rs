//! docs/reference.md is generated from the directive table, so it can
//! never drift from what `tollgate check` accepts. This test renders the
//! table and compares; `UPDATE_DOCS=1 cargo test --test docs` rewrites it.

use std::path::Path;

use tollgate::config::schema::{BlockKind, Ctx, DIRECTIVES, DirectiveSpec};

/// A section: a title, an intro, and which entries go in.
type Section = (&'static str, &'static str, fn(&DirectiveSpec) -> bool);

/// The sections, in reading order.
const SECTIONS: &[Section] = &[
    ("Anywhere", "", |d| {
        d.contexts.len() > 3 && d.contexts.contains(&Ctx::Upstream)
    }),
    (
        "Top level",
        "Blocks and settings of the file itself (or of a transparent `http { }`).",
        |d| d.contexts == [Ctx::Main],
    ),
    (
        "Servers and client connections",
        "In a `server`; the client-side limits may also stand at the top level, for every server.",
        |d| d.contexts.contains(&Ctx::Server) && !d.contexts.contains(&Ctx::Location),
    ),
    (
        "Handling requests",
        "In a `location` (some also in a `server` or at the top level, inherited down the tree: \
         headers accumulate, the same header name replaces; `rate_limit` accumulates; \
         `auth_jwt` and `cache` replace).",
        |d| d.contexts.contains(&Ctx::Location) && d.contexts.len() <= 3,
    ),
    ("`upstream NAME { }`", "", |d| {
        d.contexts.contains(&Ctx::Upstream) && d.contexts.len() < 3
    }),
    ("`auth_jwt NAME { }`", "", |d| {
        d.contexts.contains(&Ctx::AuthJwt) && d.contexts.len() < 3
    }),
    ("`rate_limit NAME { }`", "", |d| {
        d.contexts.contains(&Ctx::RateLimit) && d.contexts.len() < 3
    }),
    ("`cache NAME { }`", "", |d| {
        d.contexts.contains(&Ctx::Cache) && d.contexts.len() < 3
    }),
    ("`admin { }`", "", |d| {
        d.contexts.contains(&Ctx::Admin) && d.contexts.len() < 3
    }),
    ("`aggregate { }`", "", |d| {
        d.contexts.contains(&Ctx::Aggregate) && d.contexts.len() < 3
    }),
];

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn contexts(d: &DirectiveSpec) -> String {
    if d.contexts.len() > 3 && d.contexts.contains(&Ctx::Upstream) {
        return "any".to_string();
    }
    d.contexts
        .iter()
        .map(|c| match c {
            Ctx::Main => "top level".to_string(),
            c => c.name().to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn render() -> String {
    let mut out = String::new();
    out.push_str("# Directive reference\n\n");
    out.push_str(
        "<!-- Generated from the directive table (src/config/schema.rs) by tests/docs.rs.\n     \
         Do not edit by hand: run `UPDATE_DOCS=1 cargo test --test docs`. -->\n\n",
    );
    out.push_str(
        "Every directive `tollgate check` accepts, with where it may stand. The language \
         itself (syntax, matching, semantics) is LANGUAGE.md; additions beyond it are \
         listed in [extensions.md](extensions.md). Sizes are `512`, `64k`, `10m`, `1g`; \
         durations `500ms`, `30s`, `1m30s` (a bare number is seconds); rates `10r/s`, \
         `100r/15m`.\n\n",
    );
    let mut placed = vec![false; DIRECTIVES.len()];
    for (title, intro, pick) in SECTIONS {
        let rows: Vec<usize> = (0..DIRECTIVES.len())
            // A member of two definition blocks (`key`) is listed in both.
            .filter(|&i| (!placed[i] || title.starts_with('`')) && pick(&DIRECTIVES[i]))
            .collect();
        if rows.is_empty() {
            continue;
        }
        out.push_str(&format!("## {title}\n\n"));
        if !intro.is_empty() {
            out.push_str(intro);
            out.push_str("\n\n");
        }
        out.push_str("| syntax | context | what it does |\n|---|---|---|\n");
        for i in rows {
            placed[i] = true;
            let d = &DIRECTIVES[i];
            let block = if d.block == BlockKind::Yes {
                " (block)"
            } else {
                ""
            };
            out.push_str(&format!(
                "| `{}` | {}{} | {} |\n",
                cell(d.syntax),
                cell(&contexts(d)),
                block,
                cell(d.doc)
            ));
        }
        out.push('\n');
    }
    let left: Vec<&str> = (0..DIRECTIVES.len())
        .filter(|&i| !placed[i])
        .map(|i| DIRECTIVES[i].name)
        .collect();
    assert!(
        left.is_empty(),
        "directives in no section of tests/docs.rs: {left:?}"
    );
    out
}

#[test]
fn reference_is_generated_from_the_directive_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference.md");
    let want = render();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).expect("write docs/reference.md");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/reference.md is out of date with the directive table: \
         run `UPDATE_DOCS=1 cargo test --test docs` and commit the result"
    );
}

#[test]
fn every_directive_has_a_syntax_line_and_a_doc() {
    for d in DIRECTIVES {
        assert!(
            d.syntax.starts_with(d.name),
            "`{}`: syntax `{}` should start with the name",
            d.name,
            d.syntax
        );
        assert!(!d.doc.is_empty(), "`{}` has no doc", d.name);
    }
}

/// Every config shown in docs/ is (a contiguous part of) a file under
/// examples/, which the example tests check: a ```nginx block starts with
/// `# examples/NAME.conf` and its other lines appear in that file, in order.
#[test]
fn every_config_in_the_docs_is_an_example_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    let mut blocks = 0;
    for doc in docs {
        let text = std::fs::read_to_string(&doc).expect("read doc");
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.trim() != "```nginx" {
                continue;
            }
            blocks += 1;
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            let name = doc.display();
            let file = body
                .first()
                .and_then(|l| l.strip_prefix("# "))
                .filter(|f| f.starts_with("examples/") && f.ends_with(".conf"))
                .unwrap_or_else(|| {
                    panic!("{name}: an nginx block must start with `# examples/NAME.conf`")
                });
            let example = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("{name}: {file}: {e}"));
            let ex: Vec<&str> = example.lines().map(str::trim_end).collect();
            let want: Vec<&str> = body[1..].iter().map(|l| l.trim_end()).collect();
            let found = want.is_empty() || ex.windows(want.len()).any(|w| w == want.as_slice());
            assert!(
                found,
                "{name}: this block is not a part of {file} (keep them in step):\n{}",
                want.join("\n")
            );
        }
    }
    assert!(blocks > 0, "no nginx blocks found in docs/");
}
