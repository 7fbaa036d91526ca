#![no_main]

use kvshare_fuzz::alloc::CountingAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fuzz_target!(|data: &[u8]| kvshare_fuzz::check_block_header(data));
