//! Build script of the `aqn-rs` extension: compiles the CUDA kernels in `cuda/` to fatbins
//! (SASS for sm_80, sm_90, sm_100, sm_120 and PTX for compute_80) that `src/cuda/driver.rs`
//! embeds, and sets `cfg(aqn_cuda)` when it did.
//!
//! The kernel ABI has one owner, `src/cuda/abi.rs`, which this script compiles too: it writes
//! that file's struct layouts and launch constants into `OUT_DIR/aqn_abi.h` for nvcc, and
//! `cuda/abi.cuh` `static_assert`s the C side against them, so the two sides cannot drift
//! apart without a compile error.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc` (and `$CUDA_PATH`), `PATH`,
//! then the PyPI package `nvidia-cuda-nvcc` (`nvidia/cu13/bin/nvcc`) on the `sys.path` of the
//! build interpreter (`$PYO3_PYTHON`, which maturin sets; pip's isolated build environment
//! puts the package there when it is a build requirement).
//!
//! - `AQN_NO_CUDA=1`: CPU-only build (no nvcc needed); `aqn_rs.build_info()["cuda"]` is False.
//! - `AQN_REQUIRE_CUDA=1`: fail the build when nvcc is missing or the kernels do not compile
//!   (CI sets it, so a CPU-only wheel never ships by accident).
//! - `AQN_CUDA_ARCHS=90` (comma-separated SM numbers): SASS targets instead of 80,90,100,120;
//!   PTX is always added for the lowest one, so newer GPUs still run through the driver's JIT.
//! - `AQN_NVCC_FLAGS`: extra nvcc flags (e.g. `-allow-unsupported-compiler`, `-ccbin g++-13`).
//!
//! The exactness flags are not optional: `-fmad=false` (no FMA contraction) and no fast-math
//! (IEEE division, no flush-to-zero), so the kernels match the CPU path bit for bit.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

// Only the layouts and constants are used here; the host-side helpers serve the extension.
#[allow(dead_code)]
#[path = "src/cuda/abi.rs"]
mod abi;

/// The kernel sources, one per format family plus AQN's noise (each becomes one fatbin and one
/// CUDA module).
const SOURCES: [&str; 3] = ["mxfp4", "nvfp4", "noise"];
/// Default SASS targets: A100, H100/H200, B200, RTX 50xx/RTX PRO.
const DEFAULT_ARCHS: [u32; 4] = [80, 90, 100, 120];

fn flag(name: &str) -> bool {
    matches!(
        env::var(name).map(|v| v.trim().to_ascii_lowercase()),
        Ok(v) if v == "1" || v == "true" || v == "yes" || v == "on"
    )
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// nvcc from the PyPI package on the build interpreter's sys.path.
fn nvcc_from_python() -> Option<PathBuf> {
    let mut interpreters: Vec<String> = Vec::new();
    for var in ["PYO3_PYTHON", "PYTHON_SYS_EXECUTABLE"] {
        if let Ok(p) = env::var(var) {
            if !p.is_empty() {
                interpreters.push(p);
            }
        }
    }
    interpreters.push("python3".into());
    interpreters.push("python".into());
    const SCRIPT: &str = "import os, sys\n\
        for p in sys.path:\n\
        \x20   for d in ('cu13', 'cuda_nvcc'):\n\
        \x20       c = os.path.join(p or '.', 'nvidia', d, 'bin', 'nvcc')\n\
        \x20       if os.path.isfile(c):\n\
        \x20           print(os.path.abspath(c)); sys.exit(0)\n";
    for py in interpreters {
        let Ok(out) = Command::new(&py)
            .args(["-c", SCRIPT])
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !s.is_empty() && is_file(Path::new(&s)) {
            return Some(PathBuf::from(s));
        }
    }
    None
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        if !p.is_empty() && is_file(Path::new(&p)) {
            return Some(PathBuf::from(p));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let c = Path::new(&home).join("bin").join("nvcc");
            if is_file(&c) {
                return Some(c);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let c = dir.join("nvcc");
            if is_file(&c) {
                return Some(c);
            }
        }
    }
    nvcc_from_python()
}

fn archs() -> Vec<u32> {
    match env::var("AQN_CUDA_ARCHS") {
        Ok(s) if !s.trim().is_empty() => {
            let mut v: Vec<u32> = s
                .split(',')
                .map(|a| {
                    let a = a
                        .trim()
                        .trim_start_matches("sm_")
                        .trim_start_matches("compute_");
                    a.parse()
                        .unwrap_or_else(|_| panic!("AQN_CUDA_ARCHS: bad entry {a:?} in {s:?}"))
                })
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        _ => DEFAULT_ARCHS.to_vec(),
    }
}

/// `aqn_abi.h`: the kernel ABI as src/cuda/abi.rs lays it out, as C preprocessor constants.
fn abi_header() -> String {
    let mut h = String::from(
        "// Generated by build.rs from src/cuda/abi.rs, the one owner of the kernel ABI: the\n\
         // Rust side's layout of each kernel parameter block and its launch constants.\n\
         // cuda/abi.cuh includes this file and the kernels static_assert against it.\n\
         #pragma once\n",
    );
    for l in [
        abi::ARGS_LAYOUT,
        abi::NOISE_ARGS_LAYOUT,
        abi::MANY_ENTRY_LAYOUT,
        abi::MANY_ARGS_LAYOUT,
    ] {
        let _ = writeln!(h, "#define AQN_ABI_{}_SIZE {}", l.name, l.size);
        let _ = writeln!(h, "#define AQN_ABI_{}_ALIGN {}", l.name, l.align);
        for (field, off) in l.fields {
            let _ = writeln!(h, "#define AQN_ABI_{}_{field} {off}", l.name);
        }
    }
    for (name, value) in abi::CONSTANTS {
        let _ = writeln!(h, "#define AQN_ABI_{name} {value}");
    }
    h
}

/// Skip the kernels, or fail the build under AQN_REQUIRE_CUDA.
fn cpu_only(require: bool, why: &str) {
    if require {
        panic!("AQN_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why}");
    }
    println!("cargo:warning=aqn-rs: building WITHOUT CUDA kernels: {why}");
}

fn main() {
    println!("cargo:rustc-check-cfg=cfg(aqn_cuda)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=src/cuda/abi.rs");
    for var in [
        "AQN_NO_CUDA",
        "AQN_REQUIRE_CUDA",
        "AQN_CUDA_ARCHS",
        "AQN_NVCC_FLAGS",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PYO3_PYTHON",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = flag("AQN_REQUIRE_CUDA");
    if flag("AQN_NO_CUDA") {
        if require {
            panic!("AQN_NO_CUDA=1 and AQN_REQUIRE_CUDA=1 contradict each other");
        }
        return;
    }
    let Some(nvcc) = find_nvcc() else {
        cpu_only(
            require,
            "nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, or the nvidia-cuda-nvcc PyPI package \
             on the build interpreter's sys.path); `pip install .` pulls it as a build requirement",
        );
        return;
    };

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let src_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("cuda");
    let header = out_dir.join("aqn_abi.h");
    if let Err(e) = std::fs::write(&header, abi_header()) {
        cpu_only(require, &format!("cannot write {}: {e}", header.display()));
        return;
    }
    let archs = archs();
    let lowest = archs[0];
    let mut gencode: Vec<String> = Vec::new();
    for a in &archs {
        gencode.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    gencode.push(format!(
        "-gencode=arch=compute_{lowest},code=compute_{lowest}"
    ));
    let extra: Vec<String> = env::var("AQN_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();

    // All sources at once: nvcc is mostly single-threaded, so they overlap on any machine
    // with more than one core.
    let mut children = Vec::new();
    for name in SOURCES {
        let src = src_dir.join(format!("{name}.cu"));
        let dst = out_dir.join(format!("{name}.fatbin"));
        let child = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17", "-fmad=false", "-ftz=false"])
            .args(["-prec-div=true", "-prec-sqrt=true", "-Xptxas=-O3"])
            .args(&gencode)
            .args(&extra)
            .arg("-I")
            .arg(&src_dir)
            .arg("-I")
            .arg(&out_dir)
            .arg("-o")
            .arg(&dst)
            .arg(&src)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match child {
            Ok(c) => children.push((name, c)),
            Err(e) => {
                cpu_only(require, &format!("cannot run {}: {e}", nvcc.display()));
                return;
            }
        }
    }
    let mut failed = Vec::new();
    for (name, child) in children {
        let out = child.wait_with_output().expect("wait for nvcc");
        if !out.status.success() {
            failed.push(format!(
                "{name}.cu: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    if !failed.is_empty() {
        let msg = format!("nvcc ({}) failed:\n{}", nvcc.display(), failed.join("\n"));
        for line in msg.lines().take(40) {
            println!("cargo:warning={line}");
        }
        cpu_only(require, "nvcc failed (see the warnings above)");
        return;
    }
    let mut names: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
    names.push(format!("compute_{lowest}"));
    println!("cargo:rustc-cfg=aqn_cuda");
    println!("cargo:rustc-env=AQN_CUDA_ARCHS={}", names.join(","));
    println!("cargo:rustc-env=AQN_NVCC={}", nvcc.display());
}
