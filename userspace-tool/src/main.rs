//! `sanctl`, the sanblk admin CLI and client agent.

fn main() {
    eprintln!("sanctl: not implemented yet");
    std::process::exit(2);
}
