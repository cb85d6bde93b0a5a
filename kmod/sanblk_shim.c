// SPDX-License-Identifier: GPL-2.0
/*
 * Thin C shim for sanblk.ko: Linux 6.12 has no Rust binding for generic netlink, and the
 * helpers below are static inlines or macros bindgen cannot see. The family, op and policy
 * tables are data generated from uapi; every function is a one-line wrapper. No logic here:
 * all decisions are made in Rust (genl.rs).
 */
#include <linux/bio.h>
#include <linux/llist.h>
#include <linux/rcupdate.h>
#include <linux/net.h>
#include <linux/tcp.h>
#include <net/genetlink.h>
#include <net/net_namespace.h>
#include <net/sock.h>
#include "sanblk_uapi.h"

/* Rust: the single doit for every command (genl.rs). */
int sanblk_nl_doit(struct sk_buff *skb, struct genl_info *info);

static const struct nla_policy sanblk_policy[SANBLK_ATTR_MAX + 1] = { SANBLK_POLICY_ENTRIES };

#define SANBLK_OP(command, op_flags) { .cmd = (command), .flags = (op_flags), .doit = sanblk_nl_doit },
static const struct genl_small_ops sanblk_ops[] = { SANBLK_USER_COMMANDS(SANBLK_OP) };

static const struct genl_multicast_group sanblk_mcgrps[] = { { .name = SANBLK_EVENTS_GROUP } };

static struct genl_family sanblk_family = {
	.name = SANBLK_FAMILY_NAME,
	.version = SANBLK_FAMILY_VERSION,
	.maxattr = SANBLK_ATTR_MAX,
	.policy = sanblk_policy,
	/* Strict validation (unknown attributes, trailing bytes) for every command. */
	.resv_start_op = 1,
	.module = THIS_MODULE,
	.small_ops = sanblk_ops,
	.n_small_ops = ARRAY_SIZE(sanblk_ops),
	.mcgrps = sanblk_mcgrps,
	.n_mcgrps = ARRAY_SIZE(sanblk_mcgrps),
};

int sanblk_genl_register(void) { return genl_register_family(&sanblk_family); }
void sanblk_genl_unregister(void) { genl_unregister_family(&sanblk_family); }

u8 sanblk_genl_cmd(const struct genl_info *info) { return info->genlhdr->cmd; }
const struct nlattr *sanblk_genl_attr(const struct genl_info *info, int type) { return info->attrs[type]; }
bool sanblk_genl_attr_missing(struct genl_info *info, int type) { return GENL_REQ_ATTR_CHECK(info, type); }
void sanblk_genl_set_err_msg(struct genl_info *info, const char *msg) { NL_SET_ERR_MSG_FMT(info->extack, "%s", msg); }

struct sk_buff *sanblk_genlmsg_new(size_t payload) { return genlmsg_new(payload, GFP_KERNEL); }
void *sanblk_genlmsg_put_reply(struct sk_buff *skb, struct genl_info *info, u8 cmd) { return genlmsg_put_reply(skb, info, &sanblk_family, 0, cmd); }
void *sanblk_genlmsg_put_event(struct sk_buff *skb, u8 cmd) { return genlmsg_put(skb, 0, 0, &sanblk_family, 0, cmd); }
void sanblk_genlmsg_end(struct sk_buff *skb, void *hdr) { genlmsg_end(skb, hdr); }
int sanblk_genlmsg_reply(struct sk_buff *skb, struct genl_info *info) { return genlmsg_reply(skb, info); }
int sanblk_genlmsg_multicast_events(struct sk_buff *skb, gfp_t flags) { return genlmsg_multicast(&sanblk_family, skb, 0, 0, flags); }
void sanblk_nlmsg_free(struct sk_buff *skb) { nlmsg_free(skb); }

int sanblk_nla_put_u32(struct sk_buff *skb, int type, u32 value) { return nla_put_u32(skb, type, value); }
int sanblk_nla_put_u64(struct sk_buff *skb, int type, u64 value) { return nla_put_u64_64bit(skb, type, value, SANBLK_ATTR_PAD); }
int sanblk_nla_put_string(struct sk_buff *skb, int type, const char *value) { return nla_put_string(skb, type, value); }
struct nlattr *sanblk_nla_nest_start(struct sk_buff *skb, int type) { return nla_nest_start(skb, type); }
void sanblk_nla_nest_end(struct sk_buff *skb, struct nlattr *start) { nla_nest_end(skb, start); }
void sanblk_nla_nest_cancel(struct sk_buff *skb, struct nlattr *start) { nla_nest_cancel(skb, start); }

u32 sanblk_nla_get_u32(const struct nlattr *attr) { return nla_get_u32(attr); }
u64 sanblk_nla_get_u64(const struct nlattr *attr) { return nla_get_u64(attr); }
const void *sanblk_nla_data(const struct nlattr *attr) { return nla_data(attr); }
int sanblk_nla_len(const struct nlattr *attr) { return nla_len(attr); }

void sanblk_bio_inc_remaining(struct bio *bio) { bio_inc_remaining(bio); }
void sanblk_bio_set_dev(struct bio *bio, struct block_device *bdev) { bio_set_dev(bio, bdev); }
void sanblk_rcu_read_lock(void) { rcu_read_lock(); }
void sanblk_rcu_read_unlock(void) { rcu_read_unlock(); }

/* Server path (server.rs): init_net, socket timeouts and the static inlines it needs. */
struct net *sanblk_init_net(void) { return &init_net; }
void sanblk_sock_set_timeouts(struct socket *sock, long timeout) { sock->sk->sk_rcvtimeo = sock->sk->sk_sndtimeo = timeout; }
void sanblk_sock_nodelay(struct socket *sock) { tcp_sock_set_nodelay(sock->sk); }
unsigned int sanblk_sock_poll(struct socket *sock) { return sock->ops->poll(NULL, sock, NULL); }
struct wait_queue_head *sanblk_sock_wait_head(struct socket *sock) { return sk_sleep(sock->sk); }
void sanblk_wait_entry_init(struct wait_queue_entry *entry) { init_waitqueue_entry(entry, current); }
bool sanblk_llist_add(struct llist_node *node, struct llist_head *head) { return llist_add(node, head); }
struct llist_node *sanblk_llist_del_all(struct llist_head *head) { return llist_del_all(head); }
void sanblk_set_current_interruptible(void) { set_current_state(TASK_INTERRUPTIBLE); }
void sanblk_set_current_running(void) { __set_current_state(TASK_RUNNING); }
void sanblk_sock_quickack(struct socket *sock) { tcp_sock_set_quickack(sock->sk, 1); }
void sanblk_lock_sock(struct socket *sock) { lock_sock(sock->sk); }
void sanblk_release_sock(struct socket *sock) { release_sock(sock->sk); }
int sanblk_sock_read(struct socket *sock, read_descriptor_t *desc, sk_read_actor_t actor) { return sock->ops->read_sock(sock->sk, desc, actor); }
int sanblk_sock_set_rcvlowat(struct socket *sock, int bytes) { return sock->ops->set_rcvlowat(sock->sk, bytes); }
