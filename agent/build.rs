//! Builds the eBPF object with the pinned toolchain (rust-toolchain.toml) through aya-build;
//! the agent embeds it from OUT_DIR.
//!
//! aya-build runs a nested cargo with its target directory under OUT_DIR. Each kind of build of
//! the agent (clippy's check, the debug build, `-p gammaray-agent` alone, the release build) has
//! its own OUT_DIR, so each would rebuild `core` for the BPF target and the programs from scratch:
//! about a minute apiece on a cold CI machine. Pointing that directory, through a symlink, at one
//! place in the target directory lets the nested cargo find its work fresh after the first
//! build. The nested cargo locks that directory itself, and the object is still copied into this
//! build's own OUT_DIR.
use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = Path::new(&manifest_dir).join("../ebpf");
    let root_dir = root_dir.canonicalize()?;
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let out_dir =
        PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?);
    share_nested_target_dir(&out_dir)?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "gammaray-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom("nightly-2026-07-01"),
    )
}

/// Makes `OUT_DIR/aya-build` (where aya-build puts its nested target directory) a symlink to
/// `<target dir>/ebpf-build`. Leaves OUT_DIR alone when its layout is not cargo's usual
/// `<target dir>/<profile>/build/<package>-<hash>/out`, or when a real directory is already there.
fn share_nested_target_dir(out_dir: &Path) -> anyhow::Result<()> {
    let mut up = out_dir.ancestors();
    let (Some(_out), Some(_pkg), Some(build), Some(_profile), Some(target_dir)) =
        (up.next(), up.next(), up.next(), up.next(), up.next())
    else {
        return Ok(());
    };
    if build.file_name() != Some("build".as_ref()) {
        return Ok(());
    }
    let link = out_dir.join("aya-build");
    let shared = target_dir.join("ebpf-build");
    match link.symlink_metadata() {
        // Ours from an earlier run: the shared directory may have been removed since.
        Ok(meta) if meta.file_type().is_symlink() => std::fs::create_dir_all(&shared)?,
        // A real directory from a build before this script shared one: keep using it.
        Ok(_) => {}
        Err(_) => {
            std::fs::create_dir_all(&shared)?;
            std::os::unix::fs::symlink(&shared, &link)?;
        }
    }
    Ok(())
}
