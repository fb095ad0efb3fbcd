//! The README's local-mode and Canary documentation against the code it describes: its examples
//! parse, and every field of the workload file is in its table, so neither can go stale.

use std::path::Path;

use weir_controller::platform::local::workload::Workload;
use weir_controller::spec::{self, DEFAULT_INCONCLUSIVE_LIMIT, DEFAULT_MIN_SAMPLE_COUNT};

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The text of the section that starts with the heading `heading`, up to the next heading of
/// the same or a higher level (lines in code blocks are not headings).
fn section(text: &str, heading: &str) -> String {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = text.lines().skip_while(|line| *line != heading);
    assert!(
        lines.next().is_some(),
        "the README has no section `{heading}`"
    );
    let mut in_code = false;
    let mut body = Vec::new();
    for line in lines {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !in_code && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        body.push(line);
    }
    body.join("\n")
}

/// The first ```yaml block of `text`.
fn yaml_block(text: &str) -> String {
    let start = text.find("```yaml\n").expect("a ```yaml block") + "```yaml\n".len();
    let end = text[start..].find("```").expect("the end of the block");
    text[start..start + end].to_owned()
}

#[test]
fn the_readme_documents_every_field_of_the_workload_file_and_its_example_parses() {
    let text = section(&readme(), "### The workload file");
    let example = Workload::parse("mhs", &yaml_block(&text))
        .unwrap_or_else(|e| panic!("the README's workload example does not parse: {e}"));
    assert_eq!(
        example.args_for(8080),
        ["--listen", "127.0.0.1:8080", "--version", "1.1.2"]
    );
    assert_eq!(example.env.get("WORKERS").map(String::as_str), Some("4"));

    // Every key the file can hold has a row of the table (a field added to Workload without a
    // word in the README fails here).
    let keys = serde_yaml::to_value(&example).expect("a workload serializes");
    let keys = keys.as_mapping().expect("a workload is a map");
    assert_eq!(keys.len(), 4, "the table below lists four fields");
    for key in keys.keys() {
        let key = key.as_str().expect("keys are strings");
        assert!(
            text.contains(&format!("| `{key}` |")),
            "the README's workload table has no row for `{key}`"
        );
    }
    for placeholder in ["`{address}`", "`{port}`", "`PORT=<port>`"] {
        assert!(
            text.contains(placeholder),
            "the README explains {placeholder}"
        );
    }
    // What the README says about values in `env` is what the parser does.
    let env = |value: &str| {
        Workload::parse("mhs", &format!("command: x\nenv: {{A: {value}}}\n"))
            .map(|w| w.env.get("A").cloned().unwrap_or_default())
    };
    for (written, set) in [("4", "4"), ("true", "true"), ("~", "~"), ("\"\"", "")] {
        assert_eq!(
            env(written).ok().as_deref(),
            Some(set),
            "`A: {written}` sets `{set}`"
        );
    }
    assert!(env("[1]").is_err() && env("{b: 1}").is_err());
}

#[test]
fn the_readme_explains_min_sample_count_with_its_default_in_a_canary_that_compiles() {
    let text = section(
        &readme(),
        "## The Canary resource: Flagger's, and three fields of Weir's own",
    );
    assert!(
        text.contains(&format!(
            "**`minSampleCount`** (default {DEFAULT_MIN_SAMPLE_COUNT})"
        )),
        "the README gives minSampleCount's default"
    );
    assert!(text.contains("**`inconclusiveCountsAsFailure`** (default false)"));
    let canary = spec::from_yaml(&yaml_block(&text))
        .unwrap_or_else(|e| panic!("the README's Canary does not parse: {e}"));
    let plan = canary
        .compile()
        .unwrap_or_else(|e| panic!("the README's Canary does not compile: {e}"))
        .plan;
    assert_eq!(plan.analysis.min_sample_count, DEFAULT_MIN_SAMPLE_COUNT);
    assert!(!plan.analysis.inconclusive_counts_as_failure);
    assert!(text.contains(&format!(
        "**`inconclusiveLimit`** (default {DEFAULT_INCONCLUSIVE_LIMIT}; 0 for no limit)"
    )));
    assert_eq!(
        plan.analysis.inconclusive_limit.map(|n| n.get()),
        Some(DEFAULT_INCONCLUSIVE_LIMIT)
    );
}

#[test]
fn the_readme_has_a_section_with_an_example_for_every_operator_command() {
    let text = section(
        &readme(),
        "## Operating a rollout: status, watch, promote, abort, pause, resume, retry",
    );
    let mut verbs: Vec<&str> = weir_controller::analysis::Verb::ALL
        .iter()
        .map(|v| v.as_str())
        .collect();
    verbs.extend(["status", "watch", "retry"]);
    for verb in verbs {
        let heading = text
            .lines()
            .find(|l| l.starts_with("### ") && l.contains(&format!("weir {verb}")))
            .unwrap_or_else(|| panic!("no README section for weir {verb}"));
        let body = section(&text, heading);
        assert!(
            body.contains("```") && body.contains(&format!("weir {verb}")),
            "the README's section for weir {verb} has no example"
        );
    }
}
