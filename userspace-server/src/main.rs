//! `sand`, the sanblk server.

fn main() {
    eprintln!("sand: not implemented yet");
    std::process::exit(2);
}
