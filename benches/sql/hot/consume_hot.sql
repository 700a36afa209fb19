SELECT quota.consume('hot', 'api');
