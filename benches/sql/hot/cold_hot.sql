SELECT quota.consume('cold-hot', 'api');
