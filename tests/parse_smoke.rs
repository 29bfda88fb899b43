use tollgate::config::diagnostics::Diagnostics;
use tollgate::config::parse::parse_text;
use tollgate::config::source::FileId;

#[test]
fn parses_blocks_args_and_comments() {
    let mut d = Diagnostics::new();
    let f = parse_text(
        FileId(0),
        "# top\nserver { listen 80; # c\n location ~ \"^/a{2}$\" { return 200 'hi \\'x\\''; } }\n",
        &mut d,
    );
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(f.directives.len(), 1);
    assert_eq!(f.comments.len(), 2);
    let s = &f.directives[0];
    assert_eq!(s.children().len(), 2);
    assert_eq!(s.children()[1].args[1].value, "^/a{2}$");
    assert_eq!(s.children()[1].children()[0].args[1].value, "hi 'x'");
}

#[test]
fn missing_semicolon_before_close_and_next_line() {
    let mut d = Diagnostics::new();
    let f = parse_text(
        FileId(0),
        "server {\n    listen 80\n    server_name a;\n    proxy_pass x\n}\n",
        &mut d,
    );
    let codes: Vec<_> = d.iter().map(|x| x.code).collect();
    assert_eq!(
        codes,
        vec!["missing_semicolon", "missing_semicolon"],
        "{d:?}"
    );
    assert_eq!(f.directives[0].children().len(), 3);
}

#[test]
fn deep_nesting_is_a_diagnostic() {
    let mut d = Diagnostics::new();
    let text = "a {".repeat(100_000);
    parse_text(FileId(0), &text, &mut d);
    assert_eq!(d.iter().next().map(|x| x.code), Some("nesting_too_deep"));
}
