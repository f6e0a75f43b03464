fn main() {
    print!("{}", balanced::api::crd_yaml());
}
