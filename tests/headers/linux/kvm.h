/* GCC extensions and layout corners the generator must honour, each checked
 * against gcc by tests/test_layout_extensions.py. Not a kernel header. */
#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/stddef.h>
#define TESTIO 0xAF
/* __u128 is unsigned __int128 aligned(16) in 6.x+ linux/types.h */
struct t_u128 { __u8 a; __u128 b; __u32 c; };
struct t_i128 { char c; __int128 x; unsigned __int128 y; };
struct t_packed { __u8 a; __u32 b; __u16 c; } __attribute__((packed));
struct __attribute__((packed)) t_packed_before { __u8 a; __u64 b; };
struct t_packed_aligned { __u8 a; __u32 b; } __attribute__((packed, aligned(4)));
struct t_array_aligned { __u8 a; __u8 data[3] __attribute__((aligned(8))); __u8 b; };
struct t_member_aligned { __u8 a; __u64 b __attribute__((aligned(16))); __u8 c; };
struct t_aligned_type { __u32 a; } __attribute__((aligned(32)));
struct t_holds_aligned { __u8 a; struct t_aligned_type t; __u8 b; };
struct t_bits { __u32 a:3, b:5; __u8 c:2; __u64 d:40, :0, e:7; __u16 f:9; };
struct t_flex0 { __u32 n; __u64 e[0]; };
struct t_flex { __u32 n; __u64 e[]; };
struct t_declflex { __u32 n; __DECLARE_FLEX_ARRAY(__u16, e); };
union t_union { __u8 b[3]; __u32 w; };
struct t_nested { struct { __u8 x; union { __u16 y; __u64 z; }; } inner[2]; void *p; __aligned_u64 q; };
#define T_SHIFT (1UL << 63)
#define T_NEG (-5)
#define T_CAST ((__u32)-1)
#define T_SIZE sizeof(struct t_u128)
#define T_TERN (T_NEG < 0 ? 1 : 2)
#define T_IOR _IOR(TESTIO, 1, struct t_u128)
#define T_IOWR _IOWR(TESTIO, 2, struct t_flex)
#define T_IO _IO(TESTIO, 3)
#define T_IOW_INT _IOW(TESTIO, 4, __u64)
enum t_enum { T_A, T_B = 5, T_C };
#define T_ENUM_ALIAS T_B
#define T_UNEVAL (PAGE_SIZE / 8)
#define T_STR "hello"
#define T_OCT 017
#define T_MIX (~0U + 1UL)
