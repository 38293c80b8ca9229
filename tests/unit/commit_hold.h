/*
 * commit_hold.h - a group commit held under way, for the C unit tests of
 * what queues behind one. commit_hold_start() starts a thread whose index
 * write stops inside its transaction, and returns once it is there (it
 * leads the batch: later writes queue); commit_hold_release() lets it
 * commit and returns its result.
 */
#ifndef RENDERFS_TEST_COMMIT_HOLD_H
#define RENDERFS_TEST_COMMIT_HOLD_H

#include <pthread.h>

#include "index_i.h"

struct commit_hold {
	struct index *ix;
	pthread_t th;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int stage; /* 1: inside the transaction; 2: released */
};

static inline int commit_hold_apply(struct index *ix, MDB_txn *txn, void *arg)
{
	struct commit_hold *h = arg;

	(void)ix, (void)txn;
	pthread_mutex_lock(&h->mu);
	h->stage = 1;
	pthread_cond_broadcast(&h->cv);
	while (h->stage != 2)
		pthread_cond_wait(&h->cv, &h->mu);
	pthread_mutex_unlock(&h->mu);
	return 0;
}

static inline void *commit_hold_main(void *arg)
{
	struct commit_hold *h = arg;

	return (void *)(long)index_write(h->ix, commit_hold_apply, h);
}

static inline void commit_hold_start(struct commit_hold *h, struct index *ix)
{
	h->ix = ix;
	h->stage = 0;
	pthread_mutex_init(&h->mu, NULL);
	pthread_cond_init(&h->cv, NULL);
	pthread_create(&h->th, NULL, commit_hold_main, h);
	pthread_mutex_lock(&h->mu);
	while (h->stage != 1)
		pthread_cond_wait(&h->cv, &h->mu);
	pthread_mutex_unlock(&h->mu);
}

static inline int commit_hold_release(struct commit_hold *h)
{
	void *rc;

	pthread_mutex_lock(&h->mu);
	h->stage = 2;
	pthread_cond_broadcast(&h->cv);
	pthread_mutex_unlock(&h->mu);
	pthread_join(h->th, &rc);
	pthread_mutex_destroy(&h->mu);
	pthread_cond_destroy(&h->cv);
	return (int)(long)rc;
}

#endif
