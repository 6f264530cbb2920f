//! The `qtune` command line.
fn main() {
    println!("qtune");
}
