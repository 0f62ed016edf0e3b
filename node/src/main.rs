//! `chorus`: run a node, mint tokens, drive a client, generate load.

fn main() {
    println!("chorus: work in progress");
}
