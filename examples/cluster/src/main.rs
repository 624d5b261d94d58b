//! The clustered example server; see README.md.

fn main() {
    eprintln!("the cluster example is being built: see examples/cluster/README.md");
    std::process::exit(2);
}
