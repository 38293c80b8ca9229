/*
 * index_record.c - the byte layouts of the index's records (index.h): job
 * records (RJ4, and RJ3, RJ2 and RJ1 read), blob records, and the
 * per-route counts and the usage ledger that every job write keeps. Every record is validated as it is
 * decoded (checksum, ranges, lengths); a damaged one is STORE_E_INDEX.
 *
 * Threads: pure functions of their arguments and the caller's
 * transaction; any thread.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "blake3.h"
#include "err.h"
#include "index.h"
#include "index_i.h"

#define RECORD_FIXED 128   /* RJ2, RJ3 and RJ4 */
#define RECORD_FIXED_1 160 /* format 1 (RJ1) */

/* ---- job records ---- */

int index_str_len(const uint8_t **p, const uint8_t *end, size_t max, size_t *len)
{
	if (end - *p < 1)
		return -1;
	*len = (*p)[0];
	*p += 1;
	if (*len & 0x80) {
		/* Two bytes, canonical: the second is 1..127. */
		if (end - *p < 1 || (*p)[0] == 0 || (*p)[0] & 0x80)
			return -1;
		*len = (*len & 0x7f) | (size_t)(*p)[0] << 7;
		*p += 1;
	}
	return (size_t)(end - *p) < *len || *len > max || memchr(*p, '\0', *len) ? -1 : 0;
}

size_t index_str_put(uint8_t *p, const char *s, size_t len)
{
	size_t n = 0;

	if (len < 0x80) {
		p[n++] = (uint8_t)len;
	} else {
		p[n++] = (uint8_t)(0x80 | (len & 0x7f));
		p[n++] = (uint8_t)(len >> 7);
	}
	if (len)
		memcpy(p + n, s, len);
	return n + len;
}

/* A string: its length (u32 in format 1, LEB128 in format 2), then its
 * bytes. Returns NULL with *bad = 1 when damaged, 2 without memory. */
static char *take_str(const uint8_t **p, const uint8_t *end, bool v1, int *bad)
{
	size_t len;
	char *s;

	if (v1) {
		if (end - *p < 4)
			goto damaged;
		len = le32_get(*p);
		*p += 4;
		if ((size_t)(end - *p) < len || len > INDEX_STR_MAX || memchr(*p, '\0', len))
			goto damaged;
	} else if (index_str_len(p, end, INDEX_STR_MAX, &len) != 0) {
		goto damaged;
	}
	s = malloc(len + 1);
	if (!s) {
		*bad = 2;
		return NULL;
	}
	memcpy(s, *p, len);
	s[len] = '\0';
	*p += len;
	return s;
damaged:
	*bad = 1;
	return NULL;
}

/* Decode a job record: RJ4, RJ3 (without run_ms and ran_on), RJ2
 * (without backend and model either), or RJ1 (read when upgrading). */
int index_decode_job(struct index *ix, const uint8_t id[JOB_ID_LEN], const MDB_val *v,
		      struct job *j)
{
	const uint8_t *p = v->mv_data, *end = p + v->mv_size, *out;
	char idstr[JOB_ID_STR_LEN + 1];
	uint8_t sum[RECORD_SUM_LEN];
	bool v1, v3, v4;
	int bad = 0;

	memset(j, 0, sizeof(*j));
	if (v->mv_size < 4 + RECORD_SUM_LEN)
		goto damaged;
	v1 = memcmp(p, "RJ1", 4) == 0;
	v4 = memcmp(p, "RJ4", 4) == 0;
	v3 = v4 || memcmp(p, "RJ3", 4) == 0;
	if (!v1 && !v3 && memcmp(p, "RJ2", 4) != 0)
		goto damaged;
	if (v->mv_size < (v1 ? RECORD_FIXED_1 : RECORD_FIXED) + RECORD_SUM_LEN)
		goto damaged;
	end -= RECORD_SUM_LEN;
	index_record_sum(p, v->mv_size - RECORD_SUM_LEN, sum);
	if (memcmp(sum, end, RECORD_SUM_LEN) != 0 || p[4] > JOB_CANCELLED || p[5] > JOB_PRIO_HIGH)
		goto damaged;
	memcpy(j->id, id, JOB_ID_LEN);
	j->status = p[4];
	j->priority = p[5];
	j->group = p[6];
	j->flags = p[7];
	j->uid = le32_get(p + 8);
	j->gid = le32_get(p + 12);
	j->attempts = le32_get(p + 16);
	j->progress = (uint16_t)(p[20] | p[21] << 8);
	j->hidden = (uint16_t)(p[22] | p[23] << 8);
	j->seq = le64_get(p + 24);
	j->created_ms = le64_get(p + 32);
	j->started_ms = le64_get(p + 40);
	j->completed_ms = le64_get(p + 48);
	j->updated_ms = le64_get(p + 56);
	j->timeout_ms = le64_get(p + 64);
	j->log_size = le64_get(p + 72);
	j->round = le64_get(p + 80);
	out = p + (v1 ? 120 : 88); /* format 1: the request digest at 88 */
	memcpy(j->output_hash, out, 32);
	j->output_size = le64_get(out + 32);
	if (j->progress > 1000)
		goto damaged;
	p += v1 ? RECORD_FIXED_1 : RECORD_FIXED;
	j->route = take_str(&p, end, v1, &bad);
	j->name = take_str(&p, end, v1, &bad);
	j->media_type = take_str(&p, end, v1, &bad);
	j->device = take_str(&p, end, v1, &bad);
	j->error_code = take_str(&p, end, v1, &bad);
	j->error_message = take_str(&p, end, v1, &bad);
	if (v3) {
		j->backend = take_str(&p, end, false, &bad);
		j->model = take_str(&p, end, false, &bad);
	} else if (!(j->backend = strdup("")) || !(j->model = strdup(""))) {
		bad = 2;
	}
	if (v4 && !bad) {
		if (end - p < 8) {
			bad = 1;
		} else {
			j->run_ms = le64_get(p);
			p += 8;
			j->ran_on = take_str(&p, end, false, &bad);
		}
	} else if (!bad && !(j->ran_on = strdup(""))) {
		bad = 2;
	}
	if (bad == 2) {
		job_release(j);
		return -ENOMEM;
	}
	if (bad || p != end || !j->route[0] || !j->ran_on) {
		job_release(j);
		goto damaged;
	}
	return 0;
damaged:
	ulid_format(id, idstr);
	return store_seterr(STORE_E_INDEX, "job %s has a damaged record in '%s/data.mdb'", idstr,
			    ix->dir);
}

static size_t str_len(const char *s)
{
	size_t len = s ? strlen(s) : 0;
	return len > INDEX_STR_MAX ? INDEX_STR_MAX : len; /* bounded: longer ones are cut */
}

static size_t put_str(uint8_t *p, const char *s)
{
	return index_str_put(p, s, str_len(s));
}

int index_put_job(struct index *ix, MDB_txn *txn, const struct job *j)
{
	const char *strs[8] = {j->route,      j->name,	       j->media_type, j->device,
			       j->error_code, j->error_message, j->backend,    j->model};
	size_t total = RECORD_FIXED + 8 + RECORD_SUM_LEN;
	uint8_t *buf, *p;
	MDB_val k = {JOB_ID_LEN, (void *)j->id}, v;
	uint64_t completed = j->completed_ms;
	int rc;

	/* The status it had, for the counts (a new job had none). */
	rc = mdb_get(txn, ix->jobs, &k, &v);
	if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read job");
	int old = rc == 0 && v.mv_size > 4 ? ((const uint8_t *)v.mv_data)[4] : -1;
	const uint8_t *ov = rc == 0 && v.mv_size >= RECORD_FIXED ? v.mv_data : NULL;
	uint8_t old_flags = ov ? ov[7] : 0;
	uint16_t old_progress = ov ? (uint16_t)(ov[20] | ov[21] << 8) : 0;
	/* Reaching a final state: the ledger entry's time, unique for the
	 * job (a retried job may end again within the millisecond). */
	if (j->status >= JOB_COMPLETE && old < JOB_COMPLETE &&
	    (rc = index_journal_free_time(ix, txn, j->id, &completed)) != 0)
		return rc;
	for (int i = 0; i < 8; i++) {
		size_t len = str_len(strs[i]);
		total += (len < 0x80 ? 1 : 2) + len;
	}
	total += (str_len(j->ran_on) < 0x80 ? 1 : 2) + str_len(j->ran_on);
	buf = calloc(1, total);
	if (!buf)
		return -ENOMEM;
	memcpy(buf, "RJ4", 4);
	buf[4] = (uint8_t)j->status;
	buf[5] = (uint8_t)j->priority;
	buf[6] = j->group;
	buf[7] = j->flags;
	le32_put(buf + 8, j->uid);
	le32_put(buf + 12, j->gid);
	le32_put(buf + 16, j->attempts);
	buf[20] = (uint8_t)j->progress;
	buf[21] = (uint8_t)(j->progress >> 8);
	buf[22] = (uint8_t)j->hidden;
	buf[23] = (uint8_t)(j->hidden >> 8);
	le64_put(buf + 24, j->seq);
	le64_put(buf + 32, j->created_ms);
	le64_put(buf + 40, j->started_ms);
	le64_put(buf + 48, completed);
	le64_put(buf + 56, j->updated_ms);
	le64_put(buf + 64, j->timeout_ms);
	le64_put(buf + 72, j->log_size);
	le64_put(buf + 80, j->round);
	memcpy(buf + 88, j->output_hash, 32);
	le64_put(buf + 120, j->output_size);
	p = buf + RECORD_FIXED;
	for (int i = 0; i < 8; i++)
		p += put_str(p, strs[i]);
	le64_put(p, j->run_ms);
	p += 8;
	p += put_str(p, j->ran_on);
	index_record_sum(buf, total - RECORD_SUM_LEN, p);
	v.mv_size = total;
	v.mv_data = buf;
	if ((rc = mdb_put(txn, ix->jobs, &k, &v, 0)) != 0)
		rc = index_lmdb_err(ix, rc, "write job");
	else if (j->flags & JOB_F_WEBHOOK) /* deliveries with the change (SPEC §13) */
		rc = index_hooks_on_put(ix, txn, j, old, old_flags, old_progress, buf, total);
	free(buf);
	if (rc)
		return rc;
	if (old == (int)j->status)
		return 0;
	if (j->status >= JOB_COMPLETE) {
		/* Final, however it got there: its credentials are wiped and
		 * its remote work is over (a retry starts anew). */
		if ((rc = mdb_del(txn, ix->creds, &k, NULL)) != 0 && rc != MDB_NOTFOUND)
			return index_lmdb_err(ix, rc, "wipe credentials");
		if ((rc = mdb_del(txn, ix->handles, &k, NULL)) != 0 && rc != MDB_NOTFOUND)
			return index_lmdb_err(ix, rc, "drop handle");
		/* The usage ledger, with the final state (SPEC §14). */
		if (old < JOB_COMPLETE && (rc = index_usage_add(ix, txn, j, completed)) != 0)
			return rc;
		if (j->status == JOB_COMPLETE && (rc = index_replica_job_complete(ix, txn, j)) != 0)
			return rc;
		/* Its inputs may leave the cache now. */
		if (old >= 0 && old < JOB_COMPLETE && (rc = index_pins_move(ix, txn, j->id, -1)) != 0)
			return rc;
	} else if (old >= JOB_COMPLETE && (rc = index_pins_move(ix, txn, j->id, 1)) != 0) {
		return rc; /* queued again: its inputs are needed again */
	}
	return index_count_move(ix, txn, j->route, old, (int)j->status);
}

/* The counts value: one u64 per status (LE), INDEX_STATUSES of them. */
int index_count_move(struct index *ix, MDB_txn *txn, const char *route, int from, int to)
{
	uint8_t val[INDEX_STATUSES * 8];
	MDB_val k = {strlen(route), (void *)route}, v;
	uint64_t n[INDEX_STATUSES] = {0};
	bool any = false;
	int rc;

	if (k.mv_size == 0 || k.mv_size > INDEX_ROUTE_MAX)
		return store_seterr(STORE_E_INDEX, "damaged route in '%s/data.mdb'", ix->dir);
	rc = mdb_get(txn, ix->counts, &k, &v);
	if (rc && rc != MDB_NOTFOUND)
		return index_lmdb_err(ix, rc, "read counts");
	if (rc == 0) {
		if (v.mv_size != sizeof(val))
			return store_seterr(STORE_E_INDEX, "damaged counts of '%s' in '%s/data.mdb'",
					    route, ix->dir);
		for (int i = 0; i < INDEX_STATUSES; i++)
			n[i] = le64_get((const uint8_t *)v.mv_data + 8 * i);
	}
	if (from >= INDEX_STATUSES || to >= INDEX_STATUSES)
		return store_seterr(STORE_E_INDEX, "job status %d out of range", from > to ? from : to);
	if (from >= 0) {
		if (n[from] == 0)
			return store_seterr(STORE_E_INDEX, "job count underflow for '%s' in '%s'",
					    route, ix->dir);
		n[from]--;
	}
	if (to >= 0)
		n[to]++;
	for (int i = 0; i < INDEX_STATUSES; i++) {
		le64_put(val + 8 * i, n[i]);
		any |= n[i] != 0;
	}
	if (!any) {
		rc = mdb_del(txn, ix->counts, &k, NULL);
		return rc && rc != MDB_NOTFOUND ? index_lmdb_err(ix, rc, "write counts") : 0;
	}
	v.mv_size = sizeof(val);
	v.mv_data = val;
	rc = mdb_put(txn, ix->counts, &k, &v, 0);
	return rc ? index_lmdb_err(ix, rc, "write counts") : 0;
}

int index_get_job(struct index *ix, MDB_txn *txn, const uint8_t id[JOB_ID_LEN], struct job *j)
{
	MDB_val k = {JOB_ID_LEN, (void *)id}, v;
	int rc = mdb_get(txn, ix->jobs, &k, &v);

	if (rc)
		return index_lmdb_err(ix, rc, "read job");
	return index_decode_job(ix, id, &v, j);
}

/* ---- blob records ---- */

void index_record_sum(const void *data, size_t len, uint8_t out[RECORD_SUM_LEN])
{
	uint8_t h[B3_OUT_LEN];

	b3_hash(data, len, h);
	memcpy(out, h, RECORD_SUM_LEN);
}

int index_blob_decode(struct index *ix, const MDB_val *v, struct blob_info *out)
{
	const uint8_t *p = v->mv_data;
	uint8_t sum[RECORD_SUM_LEN];
	size_t mlen;

	if (v->mv_size < 24 + RECORD_SUM_LEN || v->mv_size > BLOB_REC_MAX)
		goto damaged;
	mlen = v->mv_size - 24 - RECORD_SUM_LEN;
	index_record_sum(p, v->mv_size - RECORD_SUM_LEN, sum);
	if (memcmp(sum, p + v->mv_size - RECORD_SUM_LEN, RECORD_SUM_LEN) != 0 ||
	    memchr(p + 24, '\0', mlen))
		goto damaged;
	out->size = le64_get(p);
	out->refcount = le64_get(p + 8);
	out->created_ms = le64_get(p + 16);
	memcpy(out->media_type, p + 24, mlen);
	out->media_type[mlen] = '\0';
	return 0;
damaged:
	return store_seterr(STORE_E_INDEX, "damaged blob record in '%s/data.mdb'", ix->dir);
}

size_t index_blob_encode(const struct blob_info *b, uint8_t out[BLOB_REC_MAX])
{
	size_t mlen = strnlen(b->media_type, 127);

	le64_put(out, b->size);
	le64_put(out + 8, b->refcount);
	le64_put(out + 16, b->created_ms);
	memcpy(out + 24, b->media_type, mlen);
	index_record_sum(out, 24 + mlen, out + 24 + mlen);
	return 24 + mlen + RECORD_SUM_LEN;
}
