// SPDX-License-Identifier: GPL-2.0
/*
 * C helpers for sanblk.ko, in the manner of the kernel's rust/helpers/ files: each function is a
 * one-line wrapper, named rust_helper_<what it wraps>, of a static inline or macro that
 * bindgen cannot see, or of generic netlink, which has no Rust binding in 6.12. The family,
 * op and policy tables are data generated from uapi; helpers that take the family bind it.
 * Rust declares them in kmod/ffi/helpers.rs. No logic here.
 */
#include <linux/bio.h>
#include <linux/rcupdate.h>
#include <linux/sched/mm.h>
#include <linux/wait.h>
#include <net/genetlink.h>
#include <net/sock.h>
#include "sanblk_uapi.h"

/* Rust: the single doit for every command (genl.rs). */
int sanblk_nl_doit(struct sk_buff *skb, struct genl_info *info);

static const struct nla_policy sanblk_policy[SANBLK_ATTR_MAX + 1] = { SANBLK_POLICY_ENTRIES };

#define SANBLK_OP(command, op_flags) { .cmd = (command), .flags = (op_flags), .doit = sanblk_nl_doit },
static const struct genl_small_ops sanblk_ops[] = { SANBLK_USER_COMMANDS(SANBLK_OP) };

/* Events name volumes, devices and failures: only CAP_NET_ADMIN may listen, as for the commands. */
static const struct genl_multicast_group sanblk_mcgrps[] = {
	{ .name = SANBLK_EVENTS_GROUP, .flags = GENL_MCAST_CAP_NET_ADMIN },
};

static struct genl_family sanblk_family = {
	.name = SANBLK_FAMILY_NAME,
	.version = SANBLK_FAMILY_VERSION,
	.maxattr = SANBLK_ATTR_MAX,
	.policy = sanblk_policy,
	/* Commands do their own locking (the registry lock): a QUIESCE that waits for I/O
	 * must not hold genl_mutex, which every non-parallel family shares. */
	.parallel_ops = true,
	/* Strict validation (unknown attributes, trailing bytes) for every command. */
	.resv_start_op = 1,
	.module = THIS_MODULE,
	.small_ops = sanblk_ops,
	.n_small_ops = ARRAY_SIZE(sanblk_ops),
	.mcgrps = sanblk_mcgrps,
	.n_mcgrps = ARRAY_SIZE(sanblk_mcgrps),
};

int rust_helper_genl_register_family(void) { return genl_register_family(&sanblk_family); }
int rust_helper_genl_unregister_family(void) { return genl_unregister_family(&sanblk_family); }
bool rust_helper_GENL_REQ_ATTR_CHECK(struct genl_info *info, int type) { return GENL_REQ_ATTR_CHECK(info, type); }
void rust_helper_NL_SET_ERR_MSG(struct genl_info *info, const char *msg) { NL_SET_ERR_MSG_FMT(info->extack, "%s", msg); }

struct sk_buff *rust_helper_genlmsg_new(size_t payload, gfp_t flags) { return genlmsg_new(payload, flags); }
void *rust_helper_genlmsg_put_reply(struct sk_buff *skb, struct genl_info *info, u8 cmd) { return genlmsg_put_reply(skb, info, &sanblk_family, 0, cmd); }
void *rust_helper_genlmsg_put(struct sk_buff *skb, u32 portid, u32 seq, int flags, u8 cmd) { return genlmsg_put(skb, portid, seq, &sanblk_family, flags, cmd); }
void rust_helper_genlmsg_end(struct sk_buff *skb, void *hdr) { genlmsg_end(skb, hdr); }
int rust_helper_genlmsg_reply(struct sk_buff *skb, struct genl_info *info) { return genlmsg_reply(skb, info); }
int rust_helper_genlmsg_multicast(struct sk_buff *skb, u32 portid, unsigned int group, gfp_t flags) { return genlmsg_multicast(&sanblk_family, skb, portid, group, flags); }
void rust_helper_nlmsg_free(struct sk_buff *skb) { nlmsg_free(skb); }

int rust_helper_nla_put_u32(struct sk_buff *skb, int type, u32 value) { return nla_put_u32(skb, type, value); }
int rust_helper_nla_put_u64_64bit(struct sk_buff *skb, int type, u64 value, int padattr) { return nla_put_u64_64bit(skb, type, value, padattr); }
int rust_helper_nla_put_string(struct sk_buff *skb, int type, const char *value) { return nla_put_string(skb, type, value); }
struct nlattr *rust_helper_nla_nest_start(struct sk_buff *skb, int type) { return nla_nest_start(skb, type); }
int rust_helper_nla_nest_end(struct sk_buff *skb, struct nlattr *start) { return nla_nest_end(skb, start); }

void rust_helper_bio_inc_remaining(struct bio *bio) { bio_inc_remaining(bio); }
void rust_helper_bio_set_dev(struct bio *bio, struct block_device *bdev) { bio_set_dev(bio, bdev); }

bool rust_helper_wq_has_sleeper(struct wait_queue_head *wq_head) { return wq_has_sleeper(wq_head); }

unsigned int rust_helper_memalloc_noio_save(void) { return memalloc_noio_save(); }

void rust_helper_rcu_read_lock(void) { rcu_read_lock(); }
void rust_helper_rcu_read_unlock(void) { rcu_read_unlock(); }

void rust_helper_lock_sock(struct sock *sk) { lock_sock(sk); }
