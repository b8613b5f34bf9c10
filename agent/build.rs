//! Builds the eBPF object with the pinned toolchain (rust-toolchain.toml) through aya-build;
//! the agent embeds it from OUT_DIR.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir).join("../ebpf");
    let root_dir = root_dir.canonicalize()?;
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "gammaray-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom("nightly-2026-07-01"),
    )
}
