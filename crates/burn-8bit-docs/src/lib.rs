//! The Rust snippets of README.md and of every page of docs/, compiled and run as doc-tests
//! against the dependencies docs/getting-started.md installs (this crate's own: a test keeps the
//! two equal). Not published.
//!
//! In the workspace's test run Cargo unifies features across members, so a feature the page
//! forgets can be hidden by one another member enables; `cargo test -p burn-8bit-docs` builds
//! with this crate's dependencies alone and catches that, at the price of a second build of Burn
//! (about 25 minutes on 2 cores), which is why CI does not run it.

#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/README.md")]
mod guide {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/getting-started.md")]
mod getting_started {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/backends-and-block-size.md")]
mod backends_and_block_size {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/overrides-and-stable-embedding.md")]
mod overrides_and_stable_embedding {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/checkpoints.md")]
mod checkpoints {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/precision-and-memory.md")]
mod precision_and_memory {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/scaling-out.md")]
mod scaling_out {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/quantization.md")]
mod quantization {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/algorithm.md")]
mod algorithm {}

#[cfg(doctest)]
#[doc = include_str!("../../../docs/benchmarks.md")]
mod benchmarks {}

#[cfg(test)]
mod tests {
    use toml::{Table, Value};

    /// The `[dependencies]` of the first TOML block of docs/getting-started.md.
    fn install_snippet() -> Table {
        let page = include_str!("../../../docs/getting-started.md");
        let start = page.find("```toml\n").expect("the page shows a Cargo.toml") + "```toml\n".len();
        let end = start + page[start..].find("```").expect("the TOML block ends");
        let snippet: Table = page[start..end].parse().expect("the page's TOML parses");
        snippet["dependencies"].as_table().expect("a [dependencies] table").clone()
    }

    /// A dependency as a table (`"=0.22.1"` is `{ version = "=0.22.1" }`), without `path`: the
    /// page's path is the user's checkout, this crate's is the repository root.
    fn normalised(dependency: &Value) -> Table {
        let mut table = match dependency {
            Value::String(version) => Table::from_iter([("version".to_string(), Value::String(version.clone()))]),
            Value::Table(table) => table.clone(),
            other => panic!("a dependency is a version or a table, got {other}"),
        };
        table.remove("path");
        table
    }

    /// A page added to docs/ without its module above would go untested.
    #[test]
    fn every_page_is_included() {
        let source = include_str!("lib.rs");
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        for entry in std::fs::read_dir(&docs).expect("docs/ is readable") {
            let name = entry.expect("a directory entry").file_name().to_string_lossy().into_owned();
            if name.ends_with(".md") {
                let include = format!("include_str!(\"../../../docs/{name}\")");
                assert!(source.contains(&include), "docs/{name} is not compiled as a doc-test module");
            }
        }
    }

    #[test]
    fn the_install_snippet_is_this_crates_manifest() {
        let manifest: Table = include_str!("../Cargo.toml").parse().expect("the manifest parses");
        let ours = manifest["dependencies"].as_table().expect("[dependencies]");
        let page = install_snippet();
        let names = |table: &Table| table.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&page), names(ours), "the page installs other crates than the snippets are tested with");
        for (name, dependency) in &page {
            assert_eq!(normalised(dependency), normalised(&ours[name]), "`{name}` differs between the page and the manifest");
        }
    }
}
