//! `format_source` on any UTF-8 text: when it succeeds, its output formats
//! to itself, parses without diagnostics, and says the same thing as the
//! input (directive names, argument values, nesting, comments in order).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::ast::{Directive, File};
use tollgate::config::diagnostics::Diagnostics;
use tollgate::config::format::format_source;
use tollgate::config::parse::parse_text;
use tollgate::config::source::FileId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = format_source(text) else {
        return;
    };

    let mut diags = Diagnostics::new();
    let reparsed = parse_text(FileId(0), &once, &mut diags);
    assert!(
        diags.is_empty(),
        "formatted output has diagnostics:\n{once}\n{diags:?}"
    );

    let twice = match format_source(&once) {
        Ok(t) => t,
        Err(d) => panic!("formatting the output failed:\n{once}\n{d:?}"),
    };
    assert_eq!(once, twice, "not idempotent for {text:?}");

    let mut diags = Diagnostics::new();
    let original = parse_text(FileId(0), text, &mut diags);
    assert_eq!(
        shape(&original),
        shape(&reparsed),
        "meaning changed for {text:?}"
    );
});

/// What formatting must keep: the tree of (name, argument values) and the
/// comment texts in order.
#[derive(Debug, PartialEq)]
enum Node {
    Directive(String, Vec<String>, Option<Vec<Node>>),
}

fn shape(f: &File) -> (Vec<Node>, Vec<String>) {
    fn nodes(ds: &[Directive]) -> Vec<Node> {
        ds.iter()
            .map(|d| {
                Node::Directive(
                    d.name.clone(),
                    d.args.iter().map(|a| a.value.clone()).collect(),
                    d.block.as_ref().map(|b| nodes(&b.directives)),
                )
            })
            .collect()
    }
    (
        nodes(&f.directives),
        f.comments.iter().map(|c| c.text.clone()).collect(),
    )
}
