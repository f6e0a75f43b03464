pub struct Thing;
fn f() { let _ = crate::a::g; }
